"""Built-in node types of cpcli; registered through the `cpcli.nodes` entry points like any plugin."""
