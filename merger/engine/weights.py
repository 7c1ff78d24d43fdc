"""Reading checkpoints into an existing model, tensor by tensor, without a second copy of the model;
refusing non-finite source tensors; and the digest that ties scored weights to exported ones."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open

from merger.common.errors import MergerError
from merger.common.files import atomic_path

DIGEST_PREFIX = "xxh3-128:"


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    return files


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in weight_files(path):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, handle.get_tensor(name)


def check_finite(source: str, name: str, tensor: torch.Tensor) -> None:
    """Refuse a source tensor holding NaN or inf, naming the source and the tensor."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise MergerError(
            f"source {source}: tensor {name} holds {nan} NaN and {inf} inf values; fix the checkpoint, or set "
            "allow_nonfinite: true (with engine.kind: mergekit) to merge it anyway"
        )


def check_checkpoint_finite(source: str, path: Path) -> None:
    """Every tensor of a checkpoint, one at a time (for engines that do not hold the sources)."""
    for name, tensor in iter_tensors(path):
        check_finite(source, name, tensor)


def parameters_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One fingerprint of named tensors: name, dtype, shape and bytes of each, in name order.

    xxh3-128 hashes at memory speed (a digest costs less than the merge it fingerprints); it guards
    against accidental differences (another engine, another random draw, a wrong export), not attacks.
    """
    digest = xxhash.xxh3_128()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return DIGEST_PREFIX + digest.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """The digest of a model's parameters (tied ones once), as scored."""
    return parameters_digest(model.named_parameters())


def parameter_names(checkpoint: Path, trust_remote_code: bool = False) -> list[str]:
    """The parameter names (tied ones once) of the model a checkpoint's config describes, built on the
    meta device: no memory, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return [name for name, _ in model.named_parameters()]


def checkpoint_digest(checkpoint: Path, names: Iterable[str]) -> str:
    """`parameters_digest` of a checkpoint's tensors `names`, read one file at a time."""
    wanted = set(names)
    found: dict[str, torch.Tensor] = {}
    for file in weight_files(checkpoint):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in wanted:
                    found[name] = handle.get_tensor(name)
    missing = sorted(wanted - set(found))
    if missing:
        raise MergerError(f"{checkpoint} lacks {len(missing)} parameters, e.g. {missing[0]}")
    return parameters_digest(found.items())


def rewrite_tensors(checkpoint: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Replace the named tensors in a checkpoint's safetensors files, keeping its file layout, dtypes
    and metadata; each file is rewritten atomically."""
    from safetensors.torch import save_file

    for file in weight_files(checkpoint):
        with safe_open(file, framework="pt") as handle:
            metadata = handle.metadata()
            content = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        if not any(name in tensors for name in content):
            continue
        for name in content:
            if name in tensors:
                content[name] = tensors[name].detach().to("cpu", content[name].dtype).contiguous()
        with atomic_path(file) as partial:
            save_file(content, str(partial), metadata=metadata)


def load_into(model: torch.nn.Module, path: Path) -> None:
    """Copy a checkpoint's tensors into the model's parameters and buffers in place."""
    targets = model.state_dict(keep_vars=True)
    missing = set(targets)
    with torch.no_grad():
        for name, tensor in iter_tensors(path):
            if name in targets:
                targets[name].data.copy_(tensor)
                missing.discard(name)
    tied = {
        name
        for name in missing
        if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)
    }
    unexpected_missing = {name for name in missing - tied if not name.endswith(("rotary_emb.inv_freq",))}
    if unexpected_missing:
        raise ValueError(
            f"{path} lacks {len(unexpected_missing)} tensors, e.g. {sorted(unexpected_missing)[0]}"
        )


class CandidateWeights:
    """An engine's candidate as a checkpoint sees it: a checkpoint loaded into it, its tensors under
    their checkpoint names (what an export holds), and their digest (what the ledger records)."""

    model: torch.nn.Module

    def load_checkpoint(self, path: Path) -> None:
        load_into(self.model, path)

    def exported_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()  # tied names too, as mergekit may write them

    def digest(self) -> str:
        return model_digest(self.model)
