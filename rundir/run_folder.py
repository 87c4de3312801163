"""Who may write into a run folder, and what a run folder already holds: main.py's rules and the
launchers' skip check (docs/training-and-run-folders.md).

- One live run per folder: rank 0 takes the folder's lease (rundir/lease.py) before anything is written;
  every rank of a refused run stops with exit code 2 and one line naming the owner.
- A finished run is final: ``--resume auto`` with no larger ``--epochs`` than ``finished.json`` says prints
  "already finished" and exits 0 without touching the folder (not even a lease). A larger ``--epochs``
  extends it (``finished.json`` goes when the extension starts training).
- A folder that already holds a run (``RUN_FILES``) is only written into to continue it (``--resume auto``,
  or ``--resume`` one of its own checkpoints) or, with ``--overwrite``, after deleting it.
- Destructive steps (``--overwrite``'s deletion, dropping ``finished.json`` for an extension, removing
  temporary files of interrupted saves) wait for ``RunFolder.prepare()``, called once every input was
  checked, so a run that fails on a bad flag or dataset loses nothing.

``status`` is the launchers' skip check: one line saying why, and the exit code (0: free to start or resume,
3: finished, 4: live); its command line for the sbatch scripts is slurm/status.py.
"""
import fnmatch
import json
import math
import os
from pathlib import Path
from typing import Optional

from rundir import checkpoint as ckpt
from rundir import lease as leases
from util import dist
from util.errors import UserError

FINISHED = "finished.json"
# files that make a folder "hold a run": without them (a run that stopped before its first write, or one
# with only config.json from a start that failed) the folder is free to start in
RUN_FILES = ("checkpoint*.pth", "log.txt", "events.out.tfevents.*", FINISHED)
# what --overwrite deletes: the run's own files (other files and sub-folders, e.g. submitit/, stay)
OVERWRITTEN = RUN_FILES + ("config.json", "eval.json")
# temporary files of interrupted writes other than checkpoints (util/tb.py's event rewrite)
_OTHER_TEMPS = (".tb_rewrite.tmp",)

STATUS_GO, STATUS_FINISHED, STATUS_LIVE = 0, 3, 4


def _matching(folder: Path, patterns) -> list[str]:
    try:
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def run_files(folder) -> list[str]:
    """The files of ``folder`` that show it holds a run (RUN_FILES), sorted."""
    return _matching(Path(folder), RUN_FILES)


def finished_epochs(folder) -> Optional[float]:
    """The epoch count ``finished.json`` records; None without the file; inf when the file does not say
    (torn, or written by hand): such a run counts as finished for any --epochs."""
    path = Path(folder) / FINISHED
    if not path.exists():
        return None
    try:
        return int(json.loads(path.read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf


def _logged_epochs(folder: Path) -> int:
    """How many lines log.txt holds (epochs logged), 0 without the file."""
    try:
        return sum(1 for line in (folder / "log.txt").read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        return 0


def continues_folder(args) -> bool:
    """Does this start continue the run in --output_dir: --resume auto, or --resume one of its files."""
    if args.resume == "auto":
        return True
    if not args.resume or args.resume.startswith(("http://", "https://")):
        return False
    return Path(args.resume).expanduser().resolve().parent == Path(args.output_dir).expanduser().resolve()


def _finished_line(folder: Path, epochs: int) -> Optional[str]:
    done = finished_epochs(folder)
    if done is None or epochs > done:
        return None
    return (f"already finished: {_finished_text(folder, done)}; nothing to do with --epochs {epochs} "
            f"(a larger --epochs with --resume auto extends it)")


def busy_line(busy: leases.LeaseBusy, timeout_s: float) -> str:
    owner = busy.holder.owner
    who = owner.describe() if owner else f"an unknown owner (unreadable {busy.folder / leases.LEASE_NAME})"
    stop = f"scancel {owner.job}" if owner and owner.job else (f"kill {owner.pid} on {owner.host}" if owner else "")
    return (f"--output_dir {busy.folder} is in use by another run ({who}; {busy.reason}); wait for it to finish, "
            f"stop it{f' ({stop})' if stop else ''} or choose another --output_dir; a dead owner is taken over "
            f"at once on its own host or by its requeued Slurm job, else after --owner_timeout {timeout_s:g} s "
            f"without a heartbeat")


class RunFolder:
    """--output_dir while this run owns it. ``lease`` is held by rank 0 only (None on other ranks)."""

    def __init__(self, args, lease: Optional[leases.Lease]):
        self.args, self.lease = args, lease
        self.path = Path(args.output_dir)

    def check(self) -> None:
        """Raise UserError when another process took the folder over (our heartbeat was judged dead)."""
        if self.lease is not None and self.lease.lost:
            raise UserError(f"stopped without writing: this run no longer owns {self.path} ({self.lease.lost}); "
                            f"another process judged it dead (e.g. after a stall longer than --owner_timeout) and "
                            f"took the folder over")

    def prepare(self) -> None:
        """The destructive steps of a start, right before its first write (rank 0; see the module docstring)."""
        if self.lease is None:
            return
        self.check()
        if self.args.overwrite:
            removed = _remove(self.path, _matching(self.path, OVERWRITTEN))
            if removed:
                print(f"--overwrite: removed the previous run's {', '.join(removed)} from {self.path}")
        done = finished_epochs(self.path)
        if not self.args.eval and done is not None and continues_folder(self.args):
            _remove(self.path, [FINISHED])
            print(f"extending the finished run in {self.path} from {done} to {self.args.epochs} epochs")
        temps = [os.path.basename(p) for p in ckpt.leftover_temp_files(self.path)]
        temps += _matching(self.path, _OTHER_TEMPS) + leases.leftover_files(self.path)
        size = sum(_size(self.path / n) for n in temps)
        removed = _remove(self.path, temps)
        if removed:
            print(f"removed {len(removed)} temporary files ({size / 2**20:.1f} MiB) left by interrupted writes "
                  f"in {self.path}: {', '.join(removed)}")

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _remove(folder: Path, names) -> list[str]:
    removed = []
    for name in names:
        try:
            (folder / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UserError(f"could not remove {folder / name} ({e.strerror})") from None
    return removed


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def _finished_text(folder: Path, done: float) -> str:
    if done == math.inf:
        return f"{folder} is finished ({FINISHED}, without an epoch count)"
    return f"{folder} finished {_epochs(done)} ({FINISHED})"


def _verdict(folder: Path, args) -> tuple[str, str]:
    """What the folder's content says about this start: ('run', ''), ('finished', line) or ('refuse', line)."""
    if args.eval:
        return "run", ""
    if continues_folder(args):
        line = _finished_line(folder, args.epochs)
        if line:
            return "finished", line
        logged = _logged_epochs(folder)
        if args.resume == "auto" and logged and not (folder / "checkpoint.pth").exists():
            # log lines are written after their checkpoint: the checkpoint was removed, and starting from
            # scratch would drop the logged epochs
            return "refuse", (f"--output_dir {folder} holds a run that logged {_epochs(logged)} but has no "
                              f"checkpoint.pth to resume from; restore it (or --resume one of its checkpoint*.pth), "
                              f"or pass --overwrite instead of --resume auto to start over")
        return "run", ""
    existing = run_files(folder)
    if existing and not args.overwrite:
        shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
        return "refuse", (f"--output_dir {folder} already holds a run ({shown}); pass --resume auto to continue it, "
                          f"or --overwrite to delete its checkpoints, logs and events and start over")
    return "run", ""


def _decide(args) -> tuple[str, str, Optional[leases.Lease]]:
    """Rank 0: ('run', '', lease) | ('finished', line, None) | ('refuse', line, None)."""
    folder = Path(args.output_dir)
    kind, line = _verdict(folder, args)
    if kind != "run":
        # decided without writing anything (not even a lease); a live owner is the better reason to give
        holder = leases.read_holder(folder) if kind == "refuse" else None
        if holder is not None:
            dead, reason = leases.judge(holder, leases.Owner.me(), args.owner_timeout)
            if not dead:
                line = busy_line(leases.LeaseBusy(folder, holder, reason), args.owner_timeout)
        return kind, line, None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lease = leases.acquire(folder, timeout_s=args.owner_timeout)
    except leases.LeaseBusy as busy:
        return "refuse", busy_line(busy, args.owner_timeout), None
    except OSError as e:
        return "refuse", f"--output_dir {folder} is not writable ({e.strerror or e}); choose another folder", None
    # the previous owner may have changed the folder before we got the lease; under it, nothing changes
    kind, line = _verdict(folder, args)
    if kind != "run":
        lease.release()
        return kind, line, None
    return "run", "", lease


def claim(args) -> Optional[RunFolder]:
    """Call on every rank before anything is written into --output_dir. Returns the owned RunFolder,
    or None when the run is already finished (the line is printed); raises UserError when refused."""
    kind, line, lease, failure = None, None, None, None
    if dist.is_main_process():
        try:
            kind, line, lease = _decide(args)
        except Exception as e:  # the other ranks wait for the decision: tell them before raising
            kind, line, failure = "failed", f"rank 0 could not claim --output_dir {args.output_dir} ({e})", e
    kind, line = dist.broadcast_object((kind, line))
    if failure is not None:
        raise failure
    if kind in ("refuse", "failed"):
        raise UserError(line)
    if kind == "finished":
        print(line)
        return None
    return RunFolder(args, lease)


def status(folder, epochs: Optional[int] = None, timeout_s: float = leases.DEFAULT_TIMEOUT_S) -> tuple[int, str]:
    """(exit code, line) for a launcher about to start a run in ``folder`` (module docstring); reads only."""
    folder = Path(folder)
    done = finished_epochs(folder)
    if done is not None and (epochs is None or epochs <= done):
        return STATUS_FINISHED, _finished_text(folder, done)
    holder = leases.read_holder(folder)
    note = ""
    if holder is not None:
        dead, reason = leases.judge(holder, leases.Owner.me(), timeout_s)
        owner = holder.owner.describe() if holder.owner else "an unknown owner"
        if not dead:
            return STATUS_LIVE, f"{folder} is in use by another run ({owner}; {reason})"
        note = f"; its last owner ({owner}) is dead: {reason}"
    files = run_files(folder)
    state = (f"holds {', '.join(files)}; --resume auto continues it" if files else "no run yet")
    if done is not None:
        state = f"finished {_epochs(done)}; --epochs {epochs} extends it"
    return STATUS_GO, f"{folder} is free ({state}{note})"

