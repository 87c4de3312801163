"""Saving and loading checkpoints safely.

Runs last days on preemptible Slurm nodes, so:
- ``atomic_save`` never leaves a half-written ``checkpoint.pth``: a kill mid-write keeps the previous one.
- ``load_checkpoint`` unpickles with ``weights_only=True`` (no code runs while loading) unless the user
  vouches for the file with ``--trust_checkpoint``; URLs go through the torch.hub cache.
- ``rng_state`` / ``set_rng_state`` carry the random generators across a resume, as plain data that a
  ``weights_only`` load accepts.

Putting the weights into a model is rundir/model_weights.py; making the flags agree with a checkpoint's
configuration is rundir/run_config.py.
"""
import argparse
import http.client
import os
import pickle
import random
import re
import secrets
import socket
import urllib.parse

import numpy as np
import torch

from util.errors import UserError

# Official DETR checkpoints pickle their argparse.Namespace under 'args'. Rebuilding a Namespace is
# object.__new__ plus filling its __dict__ with values the weights_only unpickler already vetted, so
# allowing it runs no code; every other global stays refused.
_SAFE_GLOBALS = [argparse.Namespace]

# How long a checkpoint download may stall. Compute nodes without internet often drop packets instead
# of refusing connections, and urllib would otherwise wait for the kernel's connect timeout per attempt.
_DOWNLOAD_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------------
# Writing and reading files


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` such that ``path`` holds either the old or the new file, never a mix.

    Writes a temporary file in the same folder (same filesystem, so the rename is atomic), fsyncs it,
    ``os.replace``s it onto ``path`` and fsyncs the folder so the rename survives a node crash. On any
    exception, KeyboardInterrupt included, the temporary file is removed and ``path`` is untouched.
    A filesystem error (read-only folder, full disk, quota) raises UserError naming ``path``, also when
    torch reports it as its own RuntimeError ("unexpected pos ..."): the failed write is recorded where
    it happens, in the file object handed to torch.
    A process killed by SIGKILL mid-write can leave a ``.<name>.<pid>.<hex>.tmp`` file behind; it is
    never read, and ``leftover_temp_files`` finds it for removal at the run's next start.
    """
    path = os.path.abspath(os.path.expanduser(path))
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    try:
        # os.open with mode 0o666 lets the umask decide the permissions, as a plain torch.save would
        # (tempfile.mkstemp would make checkpoints private to their owner).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise _write_error(path, e) from e
    writer = _RecordingWriter(os.fdopen(fd, 'wb'))
    try:
        with writer.file:
            torch.save(obj, writer)
            writer.file.flush()
            os.fsync(writer.file.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        failure = e if isinstance(e, OSError) else writer.error
        if failure is not None and not isinstance(e, KeyboardInterrupt):
            raise _write_error(path, failure) from e
        raise
    _fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = 'file') -> None:
    """Write a small text file (config.json, finished.json, a rewritten log.txt) the way ``atomic_save``
    writes a checkpoint: the old content or the new, never a torn file; OSError -> UserError naming it."""
    path = os.path.abspath(os.path.expanduser(path))
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    try:
        with open(tmp, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise UserError(f'could not write {what} {path} ({_os_reason(e)}); its previous content, if any, is '
                        f'unchanged: free space or choose another --output_dir') from e


def append_line(path: str | os.PathLike, line: str, what: str = 'file') -> None:
    """Append one line (log.txt); OSError -> UserError naming the file. A line torn by a full disk is
    dropped when the run resumes (training._truncate_log)."""
    try:
        with open(path, 'a') as f:
            f.write(line + '\n')
    except OSError as e:
        raise UserError(f'could not write {what} {path} ({_os_reason(e)}); free space or choose another '
                        f'--output_dir, then resume with --resume auto') from e


class _RecordingWriter:
    """The file object torch.save writes to; keeps the OSError of a failed write, which torch replaces by
    a RuntimeError of its own."""

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self.error = e
            raise


def _write_error(path: str, e: OSError) -> UserError:
    return UserError(f'could not write checkpoint {path} ({_os_reason(e)}); the previous {os.path.basename(path)}, '
                     f'if any, is unchanged: free space or choose another --output_dir, then resume with '
                     f'--resume auto')


_TMP_RE = re.compile(r'^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$')


def leftover_temp_files(folder: str | os.PathLike) -> list[str]:
    """The temporary files of ``atomic_save`` calls in ``folder`` that never finished (killed mid-write).
    Only safe to remove while no other process saves into the folder (the run owns it)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(folder, n) for n in names if _TMP_RE.match(n))


def load_checkpoint(path_or_url: str, trust: bool = False, check_hash: bool = False,
                    offline_hint: str = 'download it elsewhere and pass the local path with --resume PATH') -> dict:
    """Load a checkpoint dict onto the CPU from a local path or an http(s) URL.

    URLs are downloaded once into the torch.hub cache (``$TORCH_HOME/hub/checkpoints``); ``check_hash``
    verifies the SHA256 prefix in the file name (torch.hub's convention, as in DETR's published files), and
    ``offline_hint`` ends the message of a failed download (what to do instead). Unless
    ``trust`` is set the file is unpickled with ``weights_only=True``: tensors, containers, numbers and
    strings (plus argparse.Namespace, see _SAFE_GLOBALS) load; any other pickled object is refused
    before it can run code. Every failure (no network, missing file, unsafe or corrupt file) raises
    UserError with the fix.
    """
    if path_or_url.startswith(('https://', 'http://')):
        obj = _load_url(path_or_url, trust, check_hash, offline_hint)
    else:
        path = os.path.expanduser(path_or_url)
        if not os.path.isfile(path):
            what = 'is a folder, not a file' if os.path.isdir(path) else 'does not exist'
            raise UserError(f'checkpoint {path_or_url} {what}; check --resume / --finetune_from')
        obj = _load_file(path, trust, shown=path_or_url)
    if not isinstance(obj, dict):
        raise UserError(f'{path_or_url} holds a {type(obj).__name__}, not a checkpoint dict')
    return obj


def _load_url(url: str, trust: bool, check_hash: bool, offline_hint: str) -> dict:
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.hub.load_state_dict_from_url(
                url, map_location='cpu', check_hash=check_hash, weights_only=not trust)
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, 'reason', None) or e
        raise UserError(f'could not download {url} ({reason}); {offline_hint}') from e
    except Exception as e:
        # The download worked; torch.hub loads the cached copy, so name that file in the message.
        raise _load_error(e, f'{hub_cache_path(url)} (downloaded from {url})', trust) from e
    finally:
        socket.setdefaulttimeout(previous_timeout)


def hub_cache_path(url: str) -> str:
    """Where torch.hub keeps the download of ``url`` (a file put there is used instead of downloading)."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urllib.parse.urlparse(url).path))


def _load_file(path: str, trust: bool, shown: str):
    try:
        if trust:
            return torch.load(path, map_location='cpu', weights_only=False)
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except OSError as e:
        raise UserError(f'could not read checkpoint {shown} ({_os_reason(e)})') from e
    except Exception as e:
        raise _load_error(e, shown, trust) from e


def _load_error(e: Exception, shown: str, trust: bool) -> UserError:
    """Translate a torch.load failure into the UserError that says what to do."""
    blocked = re.search(r'GLOBAL ([\w.]+)', str(e))
    if isinstance(e, pickle.UnpicklingError) and blocked and not trust:
        return UserError(
            f'refusing to load {shown}: it contains pickled Python objects ({blocked.group(1)}) that could '
            f'run code when loaded; if you trust this file, pass --trust_checkpoint')
    # torch.save only writes pickle opcodes the weights_only unpickler supports, so any other
    # unpickling failure (e.g. "Unsupported operand") means the bytes are not a sound checkpoint.
    return UserError(f'could not load checkpoint {shown} ({type(e).__name__}: {_reason(e)}); it is '
                     f'truncated, corrupt or not a PyTorch checkpoint: re-download or re-create it')


# torch's weights_only errors wrap the actual reason in generic advice; these lines are the advice.
_BOILERPLATE = ('Weights only load failed', 'Please file an issue', 'Check the documentation')


def _reason(e: Exception) -> str:
    """The informative part of a load error, one sentence (error messages stay one line)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_BOILERPLATE)]
    if not lines:
        return 'unexpected end of file' if isinstance(e, EOFError) else 'no details'
    return lines[0].split('. ')[0]


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        # Some network filesystems refuse fsync on a folder. The file itself is synced and already in
        # place; only the rename's durability across a node crash is best effort there.
        pass


# ---------------------------------------------------------------------------------------------------
# Random generators


def rng_state() -> dict:
    """The state of Python's, NumPy's global, torch's CPU and (if available) every CUDA generator.

    Only plain data and tensors, so it survives ``load_checkpoint`` with ``weights_only=True``: NumPy's
    key array becomes a list of ints. Per process: under DDP each rank has its own generators.
    """
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        'python': {'version': version, 'state': list(internal), 'gauss_next': gauss_next},
        'numpy': {'name': np_name, 'keys': np_keys.tolist(), 'pos': int(np_pos),
                  'has_gauss': int(np_has_gauss), 'cached_gaussian': float(np_gauss)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore generators saved by ``rng_state``. CUDA states are restored for the devices present
    in both the saved state and this machine (a resume may see another GPU count)."""
    python = state['python']
    random.setstate((python['version'], tuple(python['state']), python['gauss_next']))
    numpy = state['numpy']
    np.random.set_state((numpy['name'], np.array(numpy['keys'], dtype=np.uint32), numpy['pos'],
                         numpy['has_gauss'], numpy['cached_gaussian']))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)
