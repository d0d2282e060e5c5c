"""`cp token`: show the cluster's join token, rotate it, or store one on a member machine."""

from __future__ import annotations

import json
import sys

import typer

from cpcli.cli.output import err_console, out_console
from cpcli.cluster import keys
from cpcli.cluster.locate import local_managers
from cpcli.errors import CpError


def _own_cluster(cluster: str | None) -> str:
    """The cluster whose manager keys this machine holds (`--cluster`, or the only one)."""
    if cluster is not None:
        return cluster
    own = [c for c in keys.known_clusters() if (keys.cluster_dir(c) / keys.MANAGER_FILE).exists()]
    if not own:
        raise CpError("this machine holds no cluster's manager keys", hint="`cp manager` makes them the first time it "
                      "starts; on a worker machine, store the manager's token with `cp token --save TOKEN`")
    if len(own) > 1:
        raise CpError(f"this machine holds the keys of {len(own)} clusters ({', '.join(own)})",
                      hint="pass --cluster NAME")
    return own[0]


def token_command(
    cluster: str = typer.Option(None, "--cluster", help="The cluster (default: the only one whose keys are here)."),
    rotate: bool = typer.Option(False, "--rotate", help="Make a new cluster secret: every member needs the new token."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Rotate without asking."),
    save: str = typer.Option(None, "--save", metavar="TOKEN", help="Store this join token here (a member machine); "
                             "`cp worker` and the other commands then need no --token."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON, for scripts."),
) -> int:
    """Print the join token workers and clients need (on the manager's machine), rotate it, or store one."""
    if save is not None:
        creds = keys.parse_token(save, "--save")
        if cluster is not None and cluster != creds.cluster:
            raise CpError(f"the token is for cluster {creds.cluster}, not {cluster}", hint="drop --cluster")
        path = keys.save_token(creds)
        err_console.print(f"stored the join token of cluster {creds.cluster} (manager key {creds.fingerprint}) in "
                          f"{path}; `cp worker` now joins with no --token", markup=False)
        return 0
    name = _own_cluster(cluster)
    if rotate:
        if not yes:
            if not sys.stdin.isatty():
                raise CpError("--rotate disconnects every member holding the current token, so it asks first",
                              hint="pass --yes to rotate without asking")
            typer.confirm(f"Rotate the secret of cluster {name}? Workers and clients on other machines are refused "
                          "until they get the new token (running sessions keep recording on their workers)",
                          abort=True, err=True)
        creds = keys.rotate(name)
        running = local_managers(name)
        err_console.print(f"rotated the secret of cluster {name}" + (
            "; the running manager refuses the old token within a second" if running else ""), markup=False)
    else:
        found = keys.manager_keys(name, create=False)
        if found is None:
            raise CpError(f"this machine holds no keys of cluster {name}", hint="run `cp token` where `cp manager "
                          f"--cluster {name}` runs")
        creds = found
    token = keys.encode_token(creds)
    if as_json:
        out_console.print_json(json.dumps({"cluster": name, "token": token, "key": creds.fingerprint}))
        return 0
    if not rotate:
        err_console.print(f"join token of cluster {name} (manager key {creds.fingerprint}); on each worker machine run "
                          "`cp worker --token TOKEN` once, or `cp token --save TOKEN`:", markup=False)
    out_console.print(token, markup=False)
    return 0
