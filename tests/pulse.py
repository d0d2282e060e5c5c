"""A private PulseAudio server with a null sink, standing in for a sound card in audio tests.

The `pulse` fixture starts `pulseaudio` as this test's child with everything in a temporary
folder: its socket, state, cookie and an ALSA config that points ALSA's `default` device at it
(through ALSA's pulse plugin, which is how PortAudio reaches it). The sink `cpcli_test` is the
default sink and its monitor the default source, so a tone played into the sink is what a
microphone node records. Only environment variables point at it (PULSE_SERVER, ALSA_CONFIG_PATH,
...); they are set for the test and its node processes and restored afterwards, so the user's
own sound session and the system's configuration are never touched. The server is stopped by
its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

SINK = "cpcli_test"
SILENCE = "cpcli_silence"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
TOOLS = ("pulseaudio", "pactl", "paplay")
PACKAGES = "pulseaudio pulseaudio-utils libasound2-plugins libportaudio2"
SYSTEM_ALSA_CONF = ("/usr/share/alsa/alsa.conf", "/etc/alsa/alsa.conf")
# Without a stream of its own, a null sink renders in 2 s chunks, so a recording would start up
# to 2 s late; a loopback of a silent source keeps it rendering every 20 ms, inside the server.
MODULES = (
    f"module-null-sink sink_name={SINK} rate=48000",
    f"module-null-source source_name={SILENCE}",
    f"module-loopback source={SILENCE} sink={SINK} latency_msec=20 source_dont_move=true sink_dont_move=true",
)
ALSA_CONF = """\
# cpcli tests: ALSA's default device is the private PulseAudio server named by PULSE_SERVER
pcm.!default {
    type pulse
    hint { show on description "cpcli test PulseAudio" }
}
ctl.!default { type pulse }
"""


@dataclass(frozen=True)
class Pulse:
    """A running private PulseAudio server."""

    pid: int
    folder: Path
    env: dict[str, str]  # the variables that point clients at it
    sink: str = SINK
    monitor: str = f"{SINK}.monitor"

    def pactl(self, *args: str) -> str:
        done = subprocess.run(["pactl", *args], env=dict(os.environ, **self.env), capture_output=True,
                              text=True, timeout=10, check=True)
        return done.stdout

    def play(self, wav: Path) -> subprocess.Popen[bytes]:
        """Start playing a WAV file into the null sink; the caller waits for it (or kills it)."""
        return subprocess.Popen(["paplay", f"--device={self.sink}", str(wav)], env=dict(os.environ, **self.env),
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)


def write_tone(path: Path, frequency_hz: float, seconds: float, samplerate: int = 48000,
               amplitude: float = 0.5) -> Path:
    """A mono 16-bit WAV of a sine tone."""
    t = np.arange(round(seconds * samplerate)) / samplerate
    samples = np.rint(amplitude * 32767 * np.sin(2 * np.pi * frequency_hz * t)).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(samplerate)
        out.writeframes(samples.tobytes())
    return path


def dominant_hz(samples: np.ndarray, samplerate: float) -> float:
    """The strongest frequency of a (frames,) or (frames x channels) signal."""
    mono = samples.reshape(len(samples), -1).astype(np.float64).mean(axis=1)
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    spectrum[0] = 0.0
    return float(np.argmax(spectrum)) * samplerate / len(mono)


def _missing() -> str:
    tools = [tool for tool in TOOLS if shutil.which(tool) is None]
    return f"{', '.join(tools)} not found (apt install {PACKAGES})" if tools else ""


def _alsa_config(folder: Path) -> str:
    """ALSA_CONFIG_PATH: the system's alsa.conf (plugins, user files), then our default on top."""
    private = folder / "asound.conf"
    private.write_text(ALSA_CONF)
    system = os.environ.get("ALSA_CONFIG_PATH") or next((p for p in SYSTEM_ALSA_CONF if Path(p).is_file()), "")
    return ":".join(p for p in (system, str(private)) if p)


def _wait_ready(proc: subprocess.Popen[bytes], env: dict[str, str], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pulseaudio exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        done = subprocess.run(["pactl", "info"], env=env, capture_output=True, text=True, timeout=5)
        if done.returncode == 0:
            for what, name in (("sink", SINK), ("source", f"{SINK}.monitor")):
                subprocess.run(["pactl", f"set-default-{what}", name], env=env, timeout=5, check=True)
            for state in ("1", "0"):  # restarts the sink's timer at the loopback's latency
                subprocess.run(["pactl", "suspend-sink", SINK, state], env=env, timeout=5, check=True)
            return
        time.sleep(0.05)
    raise RuntimeError(f"pulseaudio did not answer within {START_TIMEOUT_S:g} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)


def _refresh_portaudio() -> None:
    """PortAudio lists devices once, when initialized: if this process loaded it already, list again."""
    sd = sys.modules.get("sounddevice")
    if sd is not None:
        sd._terminate()
        sd._initialize()


@pytest.fixture
def pulse() -> Iterator[Pulse]:
    """A private PulseAudio server for one test (its own child, so the leak check sees it stopped)."""
    if missing := _missing():
        if os.environ.get("CI"):
            pytest.fail(f"PulseAudio is needed for the audio tests: {missing}")
        pytest.skip(f"PulseAudio is needed for the audio tests: {missing}")
    folder = Path(tempfile.mkdtemp(prefix="cpcli-pulse-"))  # short: a socket path has ~100 bytes
    runtime = folder / "run"
    runtime.mkdir(mode=0o700)
    socket = runtime / "native"
    env = {
        "PULSE_SERVER": f"unix:{socket}",
        "PULSE_RUNTIME_PATH": str(runtime),
        "PULSE_STATE_PATH": str(folder / "state"),
        "PULSE_COOKIE": str(folder / "cookie"),
        "PULSE_CLIENTCONFIG": str(folder / "client.conf"),
        "ALSA_CONFIG_PATH": _alsa_config(folder),
    }
    (folder / "client.conf").write_text("autospawn = no\n")
    log = folder / "pulseaudio.log"
    command = [
        "pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "-n", "--use-pid-file=no", "--disallow-exit",
        "--disable-shm=yes", f"--log-target=file:{log}", "--log-level=notice",
        f"--load=module-native-protocol-unix socket={socket} auth-anonymous=1 auth-cookie-enabled=0",
        *(f"--load={module}" for module in MODULES),
    ]
    saved = {name: os.environ.get(name) for name in env}
    proc = subprocess.Popen(command, env=dict(os.environ, **env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, dict(os.environ, **env), log)
        os.environ.update(env)
        _refresh_portaudio()
        yield Pulse(pid=proc.pid, folder=folder, env=env)
    finally:
        _stop(proc)
        _refresh_portaudio()  # while the variables still point at our folder, so no client looks elsewhere
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)
