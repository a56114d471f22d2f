"""py-spy around a benchmark batch: `python -m bench --profile` samples each worker process while the
batch runs (`--nonblocking --gil`, 200 Hz: only the thread holding the GIL, i.e. where the CPU of a
threads-pool worker goes) and summarizes where the CPU went.

    python -m bench.profile bench/results/profile-*.txt     # the summary of saved raw profiles
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def pyspy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy record --pid PID in the background until stop()."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        binary = pyspy()
        if binary is None:
            raise RuntimeError("py-spy not found: pip install py-spy (it is in the dev extras)")
        self.out = out
        self.process = subprocess.Popen([binary, "record", "--pid", str(pid), "-f", "raw", "-o", str(out),
                                         "-r", str(rate), "--nonblocking", "--gil"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def summarize(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.strip() for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples (active threads only)", "  self time:"]
    lines += [f"    {100 * n / total:5.1f}%  {f[:140]}" for f, n in own.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"    {100 * n / total:5.1f}%  {f[:140]}" for f, n in incl.most_common(top * 2)]
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarize(Path(arg)))
