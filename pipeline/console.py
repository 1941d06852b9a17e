"""What a run shows on its console: the project's own lines; everything else goes to the run's log.

A run's driver process receives other programs' output: Ray forwards every actor's and Ray Train
worker's stdout and stderr (checkpoint chatter, vLLM's and DeepSpeed's warnings, the raylet's
worker-count warnings), and Ray, transformers and DeepSpeed log through Python's logging. Without
`--verbose`, `RunConsole` routes all of it, line by line, to `RUN_DIR/logs/console.log` and keeps
the console for the driver's own lines (`say`: `[HH:MM:SS] start sft`, step lines, the figures).
Lines that report an error (a traceback, `SomethingError:`, Ray's `ERROR`) still reach the console
in full, unless they are one of the known harmless ones below; every line stays in the log.
"""
from __future__ import annotations

import io
import re
import sys
import threading
import time
from pathlib import Path

# An error someone should see, in another program's line.
ERROR = re.compile(r"Traceback \(most recent call last\)|\b[A-Z]\w*(Error|Exception)\b(:|$)|\bERROR\b|\bFATAL\b|"
                   r"Segmentation fault|core dumped|\bKilled\b")
# Known harmless lines that look like errors (each was seen on every run, with nothing wrong):
HARMLESS = re.compile(
    r"PreemptionWatcher.*constructor arguments"  # Ray Train's controller, on every fit (a glog E line)
    r"|Failed to load weights"  # vLLM's layerwise reload names a buffer-only module on every weight push
)
TRACEBACK_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?(\([^)]*\)(\x1b\[[0-9;]*m)?\s)?\s+|^\s*(File |During handling|The above exception)")


class _Router(io.TextIOBase):
    """A text stream that sends each complete line to the run's log, and to `console` when it is
    an error (or always, when verbose)."""

    def __init__(self, console: "RunConsole", real):
        self.console, self.real = console, real
        self.buffer_text = ""
        self.in_traceback = False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # other programs' progress bars and colours are for the log, not a terminal

    def fileno(self) -> int:
        return self.real.fileno()  # e.g. faulthandler, subprocess: the real stream

    def write(self, text: str) -> int:
        with self.console.lock:
            self.buffer_text += text
            *lines, self.buffer_text = self.buffer_text.split("\n")
            for line in lines:
                self.console.other(line, self._shows(line), self.real)
        return len(text)

    def _shows(self, line: str) -> bool:
        if self.console.verbose:
            return True
        if self.in_traceback and (TRACEBACK_LINE.match(line) or ERROR.search(line)):
            return True
        self.in_traceback = "Traceback (most recent call last)" in line
        return bool(ERROR.search(line)) and not HARMLESS.search(line)

    def flush(self) -> None:
        with self.console.lock:
            if self.buffer_text:
                line, self.buffer_text = self.buffer_text, ""
                self.console.other(line, self._shows(line), self.real)
            self.real.flush()


class RunConsole:
    """Installed for the life of one `run` or `resume` (a context manager); `say` is the driver's
    own line."""

    current: "RunConsole | None" = None

    def __init__(self, run_dir: Path, verbose: bool = False, stages: list[str] | None = None, live: bool | None = None):
        """stages: the run's stage names, for the live view; live: show it (default: when stderr is
        a terminal and not verbose; plain lines otherwise, e.g. in CI, a pipe or `ray job submit`)."""
        self.log_path = Path(run_dir) / "logs" / "console.log"
        self.verbose = verbose
        self.lock = threading.RLock()
        self.out, self.err = sys.stdout, sys.stderr
        is_terminal = getattr(self.err, "isatty", lambda: False)()
        self.view = LiveView(stages or []) if (live if live is not None else is_terminal and not verbose) else None
        self.live = None

    def __enter__(self) -> "RunConsole":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "a", buffering=1)
        self.log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        sys.stdout, sys.stderr = _Router(self, self.out), _Router(self, self.err)
        # Logging handlers made before (Ray's, on `import ray`) hold the real streams: point them here too.
        self.rebound = [(h, h.stream) for h in _stream_handlers() if h.stream in (self.out, self.err)]
        for handler, stream in self.rebound:
            handler.setStream(sys.stderr if stream is self.err else sys.stdout)
        RunConsole.current = self
        if self.view is not None:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self.view, console=Console(file=self.err), refresh_per_second=2, transient=False,
                             redirect_stdout=False, redirect_stderr=False)  # the routers stay in place
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if self.live is not None:
            self.live.stop()  # leaves the last view on the screen
            self.live = None
        sys.stdout, sys.stderr = self.out, self.err
        for handler, stream in self.rebound:
            handler.setStream(stream)
        for handler in _stream_handlers():  # made while routed: back to the real streams
            if isinstance(handler.stream, _Router):
                handler.setStream(handler.stream.real)
        RunConsole.current = None
        self.log.close()

    def say(self, line: str) -> None:
        """The driver's own line: to the console (stderr) and the log."""
        with self.lock:
            self._show(line, self.err)
            self.log.write(line + "\n")
            if self.view is not None:
                self.view.read(line)

    def other(self, line: str, show: bool, real) -> None:
        self.log.write(line + "\n")
        if self.view is not None:
            self.view.read_other(line)
        if show:
            self._show(line, real)

    def _show(self, line: str, real) -> None:
        if self.live is not None:  # above the live view
            from rich.text import Text

            self.live.console.print(Text.from_ansi(line), soft_wrap=True)
        else:
            real.write(line + "\n")
            real.flush()


STAGE_LINE = re.compile(r"^\[[\d:]+\] (start|done|skip|FAIL|wait|resume)\s+(\S+?)(?::| in ([\d.]+)s| |$)")
FINISHED = re.compile(r" \[(\d+)/(\d+), \d+m\d\ds\]")  # the driver's count on a done or skip line
STEP_LINE = re.compile(r"\[(\S+)\] step (\d+)/(\d+) \((\d+)s\) ?(.*)$")
# A fit's checkpoint report, Ray Train's or a kept learner's (cluster/train.py LocalSession; another
# program's line: a fit's progress, read where it is there)
FIT_REPORT = re.compile(r"(?:Reporting training result|fit checkpoint) .*/stages/([^/]+)/ray_train/.*metrics=\{([^}]*)\}")
SYMBOL = {"pending": "[dim]·[/]", "running": "[yellow]▶[/]", "done": "[green]✓[/]", "skip": "[green]=[/]",
          "FAIL": "[red]✗[/]", "wait": "[magenta]…[/]", "resume": "[yellow]▶[/]"}


class LiveView:
    """The run on a terminal: each stage with its state and time, and the running rounds' steps with
    their figures and time left. It reads the driver's own lines (`start sft`, `done  sft in 63.4s`,
    `[safe_rlhf@1] step 16/50 (15s) reward=...`), so it shows nothing the log does not say."""

    def __init__(self, stages: list[str]):
        self.t0 = time.time()
        self.state = {name: "pending" for name in stages}
        self.began: dict[str, float] = {}
        self.took: dict[str, float] = {}
        self.steps: dict[str, tuple[int, int, float, str]] = {}  # stage -> (step, of, seconds, figures)
        self.fits: dict[str, dict[str, float]] = {}  # stage -> its last reported training figures
        self.finished = (0, len(stages))  # stages finished, of how many: the driver's count

    def read(self, line: str) -> None:
        m = STAGE_LINE.match(line)
        if m:
            event, name, seconds = m.groups()
            self.state[name] = event if event != "start" else "running"
            if event in ("start", "resume"):
                self.began[name] = time.time()
            if seconds:
                self.took[name] = float(seconds)
            if event in ("done", "FAIL", "skip"):
                self.steps.pop(name, None)
                self.fits.pop(name, None)
            count = FINISHED.search(line)
            if count:
                self.finished = (int(count.group(1)), int(count.group(2)))
            return
        m = STEP_LINE.search(line)
        if m and m.group(1) in self.state:
            name, step, total, seconds, figures = m.groups()
            self.steps[name] = (int(step), int(total), float(seconds), figures)

    def read_other(self, line: str) -> None:
        """Another program's line: a fit's training report (epoch, step, loss) for its running stage."""
        m = FIT_REPORT.search(line)
        if m and self.state.get(m.group(1)) == "running":
            figures = dict(re.findall(r"'(\w+)': ([-\d.e]+)", m.group(2)))
            self.fits.setdefault(m.group(1), {}).update({k: float(v) for k, v in figures.items()})

    def __rich__(self):
        from rich.columns import Columns
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        now = time.time()
        badges = []
        for name, state in self.state.items():
            seconds = self.took.get(name, now - self.began[name] if state == "running" and name in self.began else None)
            badges.append(f"{SYMBOL.get(state, '?')} {name}" + (f" [dim]{seconds:.0f}s[/]" if seconds is not None else ""))
        minutes, secs = divmod(int(now - self.t0), 60)
        parts = [f"[bold]stages {self.finished[0]}/{self.finished[1]} finished[/], {minutes}m{secs:02d}s",
                 Columns(badges, padding=(0, 2))]
        if self.steps:
            table = Table.grid(padding=(0, 1))
            for name, (step, total, seconds, figures) in self.steps.items():
                left = seconds / step * (total - step) if step else 0.0
                table.add_row(name, ProgressBar(total=total, completed=step, width=30), f"{step}/{total}",
                              f"{figures}  [dim]~{left:.0f}s left[/]")
            parts.append(table)
        for name, figures in self.fits.items():
            shown = [f"{k} {figures[k]:.4g}" for k in ("epoch", "global_step", "loss", "train_loss", "eval_loss") if k in figures]
            parts.append(f"{name}  " + "  ".join(shown))
        return Group(*parts)


def _stream_handlers() -> list:
    import logging

    loggers = [logging.getLogger(), *(l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger))]
    return [h for l in loggers for h in l.handlers if isinstance(h, logging.StreamHandler) and hasattr(h, "stream")]


def say(line: str) -> None:
    """A line of the driver's own: through the run's console when one is installed, else stderr."""
    console = RunConsole.current
    if console is not None:
        console.say(line)
    else:
        print(line, file=sys.stderr, flush=True)
