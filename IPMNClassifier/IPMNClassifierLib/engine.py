"""Run the ``ipmn`` engine in a child process and follow it without blocking the GUI.

Pure Python (no slicer, qt, vtk or torch imports) so it works in Slicer, in ``PythonSlicer`` and in tests.

* :class:`EngineLauncher` builds the command (``PythonSlicer -m ipmn ...``) and the environment.
* :class:`EngineRun` is one running process: a reader thread puts stdout lines (stderr merged) into a
  queue; the GUI drains it from a ``QTimer`` with :meth:`EngineRun.poll`. :meth:`EngineRun.cancel` kills
  the whole process tree.
* :class:`EngineJob` is the one translator of the engine's events (:mod:`ipmn.progress`) into progress,
  log lines and one outcome, for both modules; :func:`wait_items` is the one blocking wait (tests, scripts).
* :class:`EngineWorker` keeps ``ipmn worker`` alive between cases (torch, timm and the model stay loaded).
* :func:`describe_exit` turns exit codes into words and :class:`EngineError` carries the last log lines.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ipmn.errors import IPMNError

ERROR_PREFIX = "ipmn: error:"
LOG_TAIL_LINES = 200
# Windows NTSTATUS codes seen when Python or a native library dies.
_WINDOWS_STATUS = {
    0xC0000005: "an access violation inside a native library (often a broken PyTorch/CUDA install)",
    0xC00000FD: "a stack overflow",
    0xC0000135: "a missing DLL (PyTorch cannot load: reinstall it with the PyTorch Utils module, "
                "and install the Microsoft Visual C++ Redistributable)",
    0xC0000139: "a DLL entry point that was not found (mismatched PyTorch/CUDA libraries)",
    0xC0000409: "a fatal error inside a native library",
    0xC000001D: "an illegal CPU instruction (this PyTorch build does not support this processor)",
    0xC0000017: "running out of memory",
}
# CTK's launcher (PythonSlicer, Slicer) in front of python-real: when its child is killed (e.g. by the
# out-of-memory killer) or crashes, it prints this line and exits 1 -- the signal never reaches us.
LAUNCHER_ABNORMAL_EXIT = "exit abnormally - report the problem"
_OOM_MARKERS = ("out of memory", "memoryerror", "cannot allocate memory", "std::bad_alloc",
                "defaultcpuallocator: not enough memory", "cuda error: out of memory")


class EngineError(IPMNError):
    """The engine failed: ``message`` is for the panel, ``log_tail`` for the details box."""

    def __init__(self, message: str, exit_code: int | None = None, log_tail=(), out_of_memory: bool = False,
                 cancelled: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = list(log_tail)
        self.out_of_memory = out_of_memory
        self.cancelled = cancelled

    def details(self, n: int = 20) -> str:
        return "\n".join(self.log_tail[-n:])


# ------------------------------------------------------------------------------------------- parsing
def parse_event(line: str) -> dict | None:
    """One ``--progress jsonl`` line as a dict, or None for an ordinary log line."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return None
    return event


def user_error_line(lines) -> str | None:
    """The engine's one-line user error (``ipmn: error: ...``), without the prefix."""
    for line in reversed(list(lines)):
        index = line.find(ERROR_PREFIX)
        if index >= 0:
            return line[index + len(ERROR_PREFIX):].strip()
    return None


def looks_out_of_memory(lines) -> bool:
    return any(marker in line.lower() for line in lines for marker in _OOM_MARKERS)


def launcher_abnormal_exit(lines) -> bool:
    """True when the CTK launcher reported that its ``python-real`` child was killed or crashed."""
    return any(LAUNCHER_ABNORMAL_EXIT in line.lower() for line in lines)


OOM_ADVICE = ("It ran out of memory: choose the CPU device (GPU memory is usually smaller), use the central "
              "window instead of all windows, switch off test-time augmentation and the fold ensemble, or close "
              "other programs.")


def describe_exit(code: int | None, lines=()) -> str:
    """An exit status in words (plus the engine's own message when it printed one)."""
    lines = list(lines)
    user_message = user_error_line(lines)
    if code == 0:
        return "finished"
    if code == 2 and user_message:
        return user_message
    if user_message:
        return f"{user_message} (exit code {code})"
    if code is None:
        return "the engine did not start"
    oom = looks_out_of_memory(lines)
    unsigned = code & 0xFFFFFFFF
    if unsigned in _WINDOWS_STATUS:
        text = f"the engine crashed with {_WINDOWS_STATUS[unsigned]} (exit code 0x{unsigned:08X})"
        return text + (". " + OOM_ADVICE if unsigned == 0xC0000017 else "")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code == getattr(signal, "SIGKILL", 9):
            text = (f"the engine was killed ({name}), most often by the operating system because the computer ran "
                    "out of memory")
            return text + ". " + OOM_ADVICE
        if -code == getattr(signal, "SIGSEGV", 11):
            return f"the engine crashed ({name}: segmentation fault inside a native library)"
        return f"the engine was stopped by {name}"
    if code == 137:
        return "the engine was killed (exit code 137), most often because the computer ran out of memory. " + OOM_ADVICE
    if code == 127:
        return "the Python executable or the engine could not be found (exit code 127)"
    if oom:
        return f"the engine failed (exit code {code}). " + OOM_ADVICE
    if launcher_abnormal_exit(lines):
        return ("the engine process was killed or crashed (no Python traceback), most often because the "
                "computer ran out of memory. " + OOM_ADVICE)
    last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
    if code == 1:
        return "the engine stopped with a Python error" + (f": {last}" if last else "") + " (exit code 1)"
    return f"the engine stopped with exit code {code}" + (f": {last}" if last else "")


# ------------------------------------------------------------------------------------------- processes
def kill_process_tree(pid: int) -> None:
    """Kill a process and all of its children (the launcher's child does the work, not the launcher)."""
    try:
        import psutil
    except ImportError:
        _kill_tree_without_psutil(pid)
        return
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    try:
        children = parent.children(recursive=True)
    except psutil.Error:
        children = []
    for proc in [*children, parent]:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs([*children, parent], timeout=5)


def _kill_tree_without_psutil(pid: int) -> None:
    """Fallback: ``taskkill /T`` on Windows; the process group (started as a new session) elsewhere."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        return
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except OSError:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def available_memory_gb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available / 2**30


def memory_warning(needed_gb: float) -> str | None:
    """A warning when less than ``needed_gb`` of RAM is free (None when enough or unknown)."""
    free = available_memory_gb()
    if free is None or free >= needed_gb:
        return None
    return (f"Only {free:.1f} GB of memory is free; this run may need about {needed_gb:.1f} GB. "
            "Close other programs, or use the central window without test-time augmentation or ensemble.")


def python_slicer_executable() -> str:
    """Slicer's ``PythonSlicer`` (Python with Slicer's environment); ``sys.executable`` as a last resort."""
    import shutil

    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = Path(sys.executable).with_name("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    return str(candidate) if candidate.exists() else sys.executable


class EngineLauncher:
    """How to start the engine: ``<python> -m ipmn ...`` with the module folder importable."""

    def __init__(self, python: str | None = None, module_dir=None, base_env: dict | None = None,
                 command_prefix: list | None = None):
        self.python = python or sys.executable
        self.module_dir = str(module_dir) if module_dir else str(Path(__file__).resolve().parent.parent)
        self.base_env = dict(base_env) if base_env is not None else None
        # Tests may replace "-m ipmn" by a script of their own.
        self.command_prefix = list(command_prefix) if command_prefix else [self.python, "-m", "ipmn"]

    def command(self, *args) -> list:
        return [*self.command_prefix, *[str(a) for a in args]]

    def environment(self, device: str = "auto") -> dict:
        env = dict(self.base_env if self.base_env is not None else os.environ)
        paths = [self.module_dir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they are printed
        env["PYTHONIOENCODING"] = "utf-8"  # non-ASCII paths and messages whatever the locale
        env["PYTHONUTF8"] = "1"
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"  # force CPU even where a (too small) GPU exists
        return env

    def start(self, args, device: str = "auto", stdin: bool = False) -> subprocess.Popen:
        """Start the process (never through a shell); stdout and stderr come back merged, as text."""
        kwargs = dict(
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            env=self.environment(device),
            cwd=self.module_dir,  # "-m ipmn" finds the package even if PYTHONPATH is rewritten by a launcher
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        if os.name == "nt":
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = 0  # no console window
            kwargs["startupinfo"] = info
        else:
            kwargs["start_new_session"] = True  # its own process group: the whole tree can be ended at once
        try:
            return subprocess.Popen(list(args), **kwargs)
        except OSError as exc:
            raise EngineError(f"cannot start the engine ({args[0]}): {exc.strerror or exc}") from exc


class EngineRun:
    """A running engine process whose output is read by a thread and handed over through a queue.

    ``poll()`` returns what arrived since the last call as ``(kind, payload)`` tuples:
    ``("event", dict)`` for JSON progress events, ``("log", str)`` for other lines and ``("exit", code)``
    once, when the process has ended and all its output was read.
    """

    def __init__(self, proc: subprocess.Popen, description: str = "engine"):
        self.proc = proc
        self.description = description
        self.started = time.monotonic()
        self.log_tail = collections.deque(maxlen=LOG_TAIL_LINES)
        self.returncode = None
        self.cancelled = False
        self.exited = False
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, name=f"ipmn-reader-{proc.pid}", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        stream = self.proc.stdout
        try:
            for line in iter(stream.readline, ""):
                line = line.rstrip("\r\n")
                event = parse_event(line)
                self._queue.put(("event", event) if event is not None else ("log", line))
        except (OSError, ValueError):
            pass
        finally:
            code = self.proc.wait()
            self._queue.put(("exit", code))

    def _take(self, item):
        kind, payload = item
        if kind == "log":
            self.log_tail.append(payload)
        elif kind == "event":
            if payload.get("event") == "error" and payload.get("message"):
                self.log_tail.append(f"{ERROR_PREFIX} {payload['message']}")
        elif kind == "exit":
            self.returncode = payload
            self.exited = True
        return item

    def poll(self, max_items: int = 1000) -> list:
        items = []
        while len(items) < max_items:
            try:
                items.append(self._take(self._queue.get_nowait()))
            except queue.Empty:
                break
        return items

    def next(self, timeout: float | None = None):
        """Block for the next item (None on timeout)."""
        try:
            return self._take(self._queue.get(timeout=timeout))
        except queue.Empty:
            return None

    def write(self, obj) -> None:
        if self.proc.stdin is None:
            raise EngineError("this engine process takes no requests")
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            raise EngineError("the engine process is not accepting requests (it has stopped)",
                              exit_code=self.proc.poll(), log_tail=self.log_tail) from exc

    def cancel(self) -> None:
        """Kill the process tree; the reader thread then reports ``("exit", code)``."""
        self.cancelled = True
        if self.proc.poll() is None:
            kill_process_tree(self.proc.pid)

    def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def error(self) -> EngineError:
        """An EngineError describing why the process ended."""
        if self.cancelled:
            return EngineError("cancelled", exit_code=self.returncode, log_tail=self.log_tail, cancelled=True)
        lines = list(self.log_tail)
        return EngineError(describe_exit(self.returncode, lines), exit_code=self.returncode, log_tail=lines,
                           out_of_memory=(looks_out_of_memory(lines) or self.returncode in (-9, 137)
                                          or launcher_abnormal_exit(lines)))


class EngineJob:
    """The one translator of engine events: what a one-shot run, or one request to the worker, is doing.

    :meth:`feed` takes the raw ``(kind, payload)`` items of an :class:`EngineRun` and returns
    ``("event", dict)`` for progress events (``stage``, ``epoch``, ``fold_done``, ``warning``, ``ready`` ...),
    ``("log", line)`` for other output, and finally once ``("finished", done event)`` or
    ``("failed", EngineError)``. A one-shot run ends when its process exits (a ``done`` event and exit code
    0, or an ``error`` event / a non-zero exit); a worker request (``request=True``) ends at its ``done`` or
    ``error`` event, or when the worker process dies.
    """

    def __init__(self, run: EngineRun, request: bool = False, default_done: dict | None = None):
        self.run = run
        self.request = request
        self.default_done = default_done or {"event": "done"}
        self.finished = False
        self.done_event = None
        self.error_event = None

    def _end(self, out: list, kind: str, payload) -> list:
        self.finished = True
        out.append((kind, payload))
        return out

    def _reported_error(self, exit_code=None) -> EngineError:
        message = str(self.error_event.get("message") or "the engine reported an error")
        return EngineError(message, exit_code=exit_code, log_tail=self.run.log_tail,
                           out_of_memory=looks_out_of_memory([message]))

    def feed(self, kind: str, payload) -> list:
        out: list = []
        if self.finished:
            return out
        if kind == "event":
            name = payload.get("event")
            if name == "done":
                self.done_event = payload
                return self._end(out, "finished", payload) if self.request else out
            if name == "error":
                self.error_event = payload
                return self._end(out, "failed", self._reported_error()) if self.request else out
            out.append(("event", payload))
        elif kind == "log":
            out.append(("log", payload))
        elif kind == "exit":
            if self.error_event is not None and not self.run.cancelled:
                return self._end(out, "failed", self._reported_error(payload))
            if payload == 0 and not self.run.cancelled and not self.request:
                return self._end(out, "finished", self.done_event or self.default_done)
            return self._end(out, "failed", self.run.error())
        return out

    def wait(self, on_item=None, timeout: float | None = None) -> dict:
        """Block until the job ends, handing every item to ``on_item``; returns the done event or raises."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            item = self.run.next(timeout=0.5 if remaining is None else min(0.5, remaining))
            if item is None:
                if deadline is not None and time.monotonic() >= deadline:
                    self.run.cancel()
                    raise EngineError(f"the {self.run.description} did not finish within {timeout:.0f} s",
                                      log_tail=self.run.log_tail)
                continue
            for kind, payload in self.feed(*item):
                if on_item:
                    on_item((kind, payload))
                if kind == "finished":
                    return payload
                if kind == "failed":
                    raise payload


def wait_items(poll, cancel, on_item=None, timeout: float | None = None, interval: float = 0.05):
    """Poll a job (``poll()`` → items) until it ends; returns the ``finished`` payload or raises the
    ``failed`` one. Past ``timeout`` the job is cancelled (it then fails). For tests and scripts: the
    panels poll from a Qt timer instead."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for item in poll():
            if on_item:
                on_item(item)
            if item[0] == "finished":
                return item[1]
            if item[0] == "failed":
                raise item[1]
        if deadline is not None and time.monotonic() > deadline:
            cancel()
            deadline = None
        time.sleep(interval)


def run_blocking(launcher: EngineLauncher, args, device="auto", on_event=None, on_log=None,
                 timeout: float | None = None) -> dict:
    """Run one engine command to the end. Returns its final ``done`` event; raises EngineError otherwise."""
    run = EngineRun(launcher.start(launcher.command(*args), device=device), description=f"ipmn {args[0]}")

    def forward(item):
        kind, payload = item
        if kind == "event" and on_event:
            on_event(payload)
        elif kind == "log" and on_log:
            on_log(payload)

    done = EngineJob(run).wait(on_item=forward, timeout=timeout)
    run._thread.join(timeout=5)
    return done


class EngineWorker:
    """``ipmn worker``: one long-lived process answering predict requests, one at a time.

    The owner polls it (``poll()``) from a timer: while a request runs its items are those of
    :class:`EngineJob` (``event``, ``log``, then ``finished`` or ``failed``; a crash of the worker fails the
    current request and ends the worker), otherwise the raw ``(kind, payload)`` items of :class:`EngineRun`.
    """

    def __init__(self, launcher: EngineLauncher, device: str = "auto", key=None):
        self.launcher = launcher
        self.device = device
        self.key = key  # what the worker was started for (model, device ...): restart when it changes
        self.run = EngineRun(launcher.start(launcher.command("worker"), device=device, stdin=True),
                             description="ipmn worker")
        self.ready = False
        self.busy = False
        self.request = None
        self.job: EngineJob | None = None

    @property
    def alive(self) -> bool:
        return self.run.proc.poll() is None

    def submit(self, request: dict) -> None:
        if self.busy:
            raise EngineError("the engine is still busy with the previous case")
        self.request = dict(request)
        self.busy = True
        self.job = EngineJob(self.run, request=True)
        self.run.write({"cmd": "predict", **request})

    def poll(self) -> list:
        """Raw items of the worker; while a request runs, translated by its :class:`EngineJob`."""
        out = []
        for kind, payload in self.run.poll():
            if kind == "event" and payload.get("event") == "ready":
                self.ready = True
            if self.job is not None and not self.job.finished:
                out += self.job.feed(kind, payload)
                if self.job.finished:
                    self.busy = False
                if kind != "exit":
                    continue
            out.append((kind, payload))
        return out

    def cancel(self) -> None:
        """Stop the current request by killing the worker (a fresh one starts for the next case)."""
        self.run.cancel()

    def stop(self, timeout: float = 3.0, block: bool = False) -> None:
        """Ask the worker to quit; kill it if it does not within ``timeout`` seconds.

        Returns at once unless ``block``: the wait (and a kill, which may wait for the process tree) runs
        in a background thread, so that closing a scene never freezes the GUI.
        """
        if not self.alive:
            return
        try:
            self.run.write({"cmd": "quit"})
            self.run.close_stdin()
        except EngineError:
            pass

        def finish():
            try:
                self.run.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.run.cancel()

        if block:
            finish()
        else:
            threading.Thread(target=finish, name=f"ipmn-stop-{self.run.pid}", daemon=True).start()
