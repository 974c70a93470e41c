"""Hugging Face interop: GPT2LMHeadModel / LlamaForCausalLM checkpoints, GGUF files, growlm directories.

One weight map per family with `{}` for the layer index (as litgpt's convert_hf_checkpoint); GPT-2's
`Conv1D` weights are stored (in, out) and transposed explicitly; its fused `c_attn` is split into q, k, v.
Unmapped keys raise; nothing is dropped silently. Weights are read only from safetensors (or
`torch.load(weights_only=True)` for legacy .bin files); remote code is never run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from growlm.errors import GrowlmError
from growlm.io import atomic_dir
from growlm.models.assets import cache_dir, smollm2_gguf
from growlm.models.config import ModelConfig
from growlm.models.model import GPT

DEFAULT_MODEL = "smollm2-135m"
GROWLM_CONFIG = "growlm_config.json"
SUPPORTED = ("gpt2", "llama")

# our name -> HF name, per family ({} = layer index). GPT-2's c_attn is handled separately.
GPT2_MAP = {
    "wte.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "blocks.{}.norm_1.weight": "transformer.h.{}.ln_1.weight",
    "blocks.{}.norm_1.bias": "transformer.h.{}.ln_1.bias",
    "blocks.{}.attn.o.weight": "transformer.h.{}.attn.c_proj.weight",
    "blocks.{}.attn.o.bias": "transformer.h.{}.attn.c_proj.bias",
    "blocks.{}.norm_2.weight": "transformer.h.{}.ln_2.weight",
    "blocks.{}.norm_2.bias": "transformer.h.{}.ln_2.bias",
    "blocks.{}.mlp.up.weight": "transformer.h.{}.mlp.c_fc.weight",
    "blocks.{}.mlp.up.bias": "transformer.h.{}.mlp.c_fc.bias",
    "blocks.{}.mlp.down.weight": "transformer.h.{}.mlp.c_proj.weight",
    "blocks.{}.mlp.down.bias": "transformer.h.{}.mlp.c_proj.bias",
    "norm_f.weight": "transformer.ln_f.weight",
    "norm_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
GPT2_CONV1D = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight", "attn.c_attn.weight")
LLAMA_MAP = {
    "wte.weight": "model.embed_tokens.weight",
    "blocks.{}.norm_1.weight": "model.layers.{}.input_layernorm.weight",
    "blocks.{}.attn.q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blocks.{}.attn.k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blocks.{}.attn.v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blocks.{}.attn.o.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blocks.{}.attn.q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blocks.{}.attn.k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blocks.{}.attn.v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blocks.{}.attn.o.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blocks.{}.norm_2.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blocks.{}.mlp.gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blocks.{}.mlp.up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blocks.{}.mlp.down.weight": "model.layers.{}.mlp.down_proj.weight",
    "blocks.{}.mlp.gate.bias": "model.layers.{}.mlp.gate_proj.bias",
    "blocks.{}.mlp.up.bias": "model.layers.{}.mlp.up_proj.bias",
    "blocks.{}.mlp.down.bias": "model.layers.{}.mlp.down_proj.bias",
    "norm_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# buffers some checkpoints carry that are not parameters
IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


# ---------------------------------------------------------------- configs
def _get(hf: Any, name: str, default: Any = None) -> Any:
    return getattr(hf, name, default) if not isinstance(hf, dict) else hf.get(name, default)


def config_from_hf(hf: Any) -> ModelConfig:
    """growlm config from a transformers config (object or dict)."""
    mt = _get(hf, "model_type")
    if mt == "gpt2":
        if _get(hf, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise GrowlmError(f"GPT-2 activation {_get(hf, 'activation_function')!r} is not supported (gelu_new only)")
        if _get(hf, "scale_attn_by_inverse_layer_idx") or _get(hf, "reorder_and_upcast_attn"):
            raise GrowlmError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported")
        n_embd = _get(hf, "n_embd")
        return ModelConfig(
            vocab_size=_get(hf, "vocab_size"), block_size=_get(hf, "n_positions"), n_layer=_get(hf, "n_layer"),
            n_embd=n_embd, n_head=_get(hf, "n_head"), ffn_size=_get(hf, "n_inner") or 4 * n_embd,
            norm="layernorm", norm_eps=_get(hf, "layer_norm_epsilon", 1e-5), mlp="gelu", position="learned",
            attn_bias=True, proj_bias=True, mlp_bias=True, norm_bias=True,
            tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
            bos_token_id=_get(hf, "bos_token_id"), eos_token_id=_get(hf, "eos_token_id"), name="gpt2",
        )
    if mt == "llama":
        if _get(hf, "hidden_act", "silu") != "silu":
            raise GrowlmError(f"Llama activation {_get(hf, 'hidden_act')!r} is not supported (silu only)")
        rope = _get(hf, "rope_parameters") or {}
        scaling = _get(hf, "rope_scaling") or {}
        rtype = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rtype not in (None, "default"):
            raise GrowlmError(f"RoPE scaling {rtype!r} is not supported (default RoPE only)")
        theta = rope.get("rope_theta", _get(hf, "rope_theta", 10000.0))
        bias = bool(_get(hf, "attention_bias", False))
        eos = _get(hf, "eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        return ModelConfig(
            vocab_size=_get(hf, "vocab_size"), block_size=_get(hf, "max_position_embeddings"),
            n_layer=_get(hf, "num_hidden_layers"), n_embd=_get(hf, "hidden_size"),
            n_head=_get(hf, "num_attention_heads"),
            n_kv_head=_get(hf, "num_key_value_heads") or _get(hf, "num_attention_heads"),
            head_dim=_get(hf, "head_dim") or _get(hf, "hidden_size") // _get(hf, "num_attention_heads"),
            ffn_size=_get(hf, "intermediate_size"), norm="rmsnorm", norm_eps=_get(hf, "rms_norm_eps", 1e-6),
            mlp="swiglu", position="rope", rope_theta=float(theta), attn_bias=bias, proj_bias=bias,
            mlp_bias=bool(_get(hf, "mlp_bias", False)), norm_bias=False,
            tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
            bos_token_id=_get(hf, "bos_token_id"), eos_token_id=eos, name="llama",
        )
    raise GrowlmError(f"unsupported architecture {mt!r}: growlm reads {' and '.join(SUPPORTED)} checkpoints")


def config_to_hf(cfg: ModelConfig):
    """The transformers config of the class that computes exactly what `cfg` does (or a GrowlmError)."""
    from transformers import GPT2Config, LlamaConfig

    fam = cfg.family
    if fam == "gpt2":
        problems = []
        if cfg.head_dim * cfg.n_head != cfg.n_embd:
            problems.append(f"head_dim*n_head ({cfg.head_dim}*{cfg.n_head}) != n_embd ({cfg.n_embd})")
        if cfg.n_kv_head != cfg.n_head:
            problems.append("grouped KV heads")
        if not (cfg.attn_bias and cfg.proj_bias and cfg.mlp_bias and cfg.norm_bias):
            problems.append("missing biases")
        if problems:
            raise GrowlmError(f"GPT2LMHeadModel cannot represent this model: {'; '.join(problems)}")
        return GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.ffn_size, activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, architectures=["GPT2LMHeadModel"],
        )
    if fam == "llama":
        if cfg.attn_bias != cfg.proj_bias:
            raise GrowlmError("LlamaForCausalLM needs the same bias setting on q/k/v and the output projection")
        return LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_size,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
            head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=cfg.attn_bias,
            mlp_bias=cfg.mlp_bias, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, architectures=["LlamaForCausalLM"],
        )
    raise GrowlmError(
        f"no Hugging Face class matches norm={cfg.norm}, mlp={cfg.mlp}, position={cfg.position}; "
        "save it as a growlm checkpoint instead"
    )


# ---------------------------------------------------------------- state dicts
def _template_to_regex(t: str) -> re.Pattern:
    return re.compile("^" + re.escape(t).replace(r"\{\}", r"(\d+)") + "$")


def _maps(cfg: ModelConfig) -> dict[str, str]:
    return GPT2_MAP if cfg.family == "gpt2" else LLAMA_MAP


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> growlm tensors. Raises on any key it cannot place."""
    fwd = _maps(cfg)
    inverse = [(_template_to_regex(hf_t), ours) for ours, hf_t in fwd.items()]
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    gpt2 = cfg.family == "gpt2"
    for key, t in hf_sd.items():
        if IGNORED.search(key):
            continue
        if gpt2 and not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # bare GPT2Model checkpoints
        if gpt2 and key.endswith("attn.c_attn.weight") or gpt2 and key.endswith("attn.c_attn.bias"):
            i = int(key.split(".")[2])
            kind = key.rsplit(".", 1)[1]
            w = t.t() if kind == "weight" else t
            q, k, v = w.split(cfg.n_embd, dim=0)
            for n, part in zip("qkv", (q, k, v)):
                out[f"blocks.{i}.attn.{n}.{kind}"] = part.contiguous()
            continue
        for rx, ours in inverse:
            m = rx.match(key)
            if m:
                name = ours.replace("{}", m.group(1)) if m.groups() else ours
                if gpt2 and key.endswith(GPT2_CONV1D):
                    t = t.t()
                out[name] = t.contiguous()
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise GrowlmError(f"unmapped checkpoint keys for {cfg.family}: {', '.join(unmapped[:5])}" + (" ..." if len(unmapped) > 5 else ""))
    if cfg.tie_embeddings and "lm_head.weight" in out:
        head = out.pop("lm_head.weight")
        if head.data_ptr() != out["wte.weight"].data_ptr() and not torch.equal(head, out["wte.weight"]):
            raise GrowlmError("config says the head is tied but lm_head.weight differs from the embedding")
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """growlm tensors -> HF tensors (inverse of `state_dict_from_hf`)."""
    fwd = _maps(cfg)
    pats = [(_template_to_regex(ours), hf_t) for ours, hf_t in fwd.items()]
    out: dict[str, torch.Tensor] = {}
    gpt2 = cfg.family == "gpt2"
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        m = re.match(r"^blocks\.(\d+)\.attn\.([qkv])\.(weight|bias)$", name)
        if gpt2 and m:
            fused.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = t
            continue
        for rx, hf_t in pats:
            mm = rx.match(name)
            if mm:
                key = hf_t.replace("{}", mm.group(1)) if mm.groups() else hf_t
                if gpt2 and key.endswith(GPT2_CONV1D):
                    t = t.t()
                out[key] = t.contiguous()
                break
        else:
            raise GrowlmError(f"parameter {name} has no {cfg.family} counterpart")
    for (i, kind), parts in fused.items():
        cat = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"transformer.h.{i}.attn.c_attn.{kind}"] = (cat.t() if kind == "weight" else cat).contiguous()
    return out


# ---------------------------------------------------------------- models
def from_hf(hf_model) -> GPT:
    """A growlm GPT computing the same function as a transformers causal LM (GPT-2 or Llama)."""
    cfg = config_from_hf(hf_model.config)
    sd = state_dict_from_hf(dict(hf_model.state_dict()), cfg)
    return _build(cfg, sd, dtype=next(hf_model.parameters()).dtype)


def _build(cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> GPT:
    """GPT.from_state_dict, with a mismatch between weights and config reported as one GrowlmError line."""
    try:
        return GPT.from_state_dict(cfg, sd, dtype=dtype)
    except RuntimeError as e:  # load_state_dict lists missing / unexpected keys and size mismatches
        details = " ".join(ln.strip() for ln in str(e).splitlines()[1:] if ln.strip())
        raise GrowlmError(f"checkpoint does not fit the config: {details[:500]}") from None


def to_hf(model: GPT, copy: bool = True):
    """The equivalent transformers model (GPT2LMHeadModel or LlamaForCausalLM), same dtype.

    `copy=False` shares the weight tensors with `model` (no second copy: for saving right away)."""
    from transformers import AutoModelForCausalLM

    cfg = model.config
    hf_cfg = config_to_hf(cfg)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    sd = state_dict_to_hf({k: v.detach().clone() if copy else v.detach() for k, v in model.state_dict().items()}, cfg)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd[_maps(cfg)["wte.weight"]]
    hf.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        hf.tie_weights()
    # non-persistent buffers (rotary inv_freq) were created on meta: rebuild those modules on CPU
    for name, mod in list(hf.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)) and not any(True for _ in mod.parameters(recurse=False)):
            parent_name, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent_name) if parent_name else hf, child, type(mod)(config=hf.config))
    for name, buf in list(hf.named_buffers()):
        if buf.is_meta:
            raise GrowlmError(f"internal: buffer {name} left uninitialised in the exported model")
    return hf.eval()


def save_hf(model: GPT, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a Hugging Face directory (config, safetensors, generation config, tokenizer), atomically:
    a failed write leaves an existing `out_dir` as it was."""
    out_dir = Path(out_dir)
    hf = to_hf(model, copy=False)  # saved at once: sharing the weights saves a full copy
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        model.config.save(tmp / GROWLM_CONFIG)
    return out_dir


def save_growlm(model: GPT, out_dir: str | Path, tokenizer=None) -> Path:
    """A growlm directory: growlm_config.json + model.safetensors (+ tokenizer); any architecture; atomic."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.config.save(tmp / GROWLM_CONFIG)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


# ---------------------------------------------------------------- loading
def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(d.glob("*.safetensors"))
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                sd.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError) as e:
                raise GrowlmError(f"{f}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
        return sd
    bins = sorted(d.glob("pytorch_model*.bin"))
    if bins:
        sd = {}
        for f in bins:
            try:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
                raise GrowlmError(f"{f}: cannot read weights ({str(e).splitlines()[0]})") from None
        return sd
    raise GrowlmError(f"{d}: no model weights (*.safetensors or pytorch_model.bin)")


def _load_tokenizer(d: Path):
    if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def load_dir(d: str | Path, dtype: torch.dtype = torch.float32) -> tuple[GPT, Any]:
    """Load a growlm directory (growlm_config.json) or a Hugging Face directory (config.json)."""
    d = Path(d)
    if (d / GROWLM_CONFIG).exists():
        try:
            cfg = ModelConfig.load(d / GROWLM_CONFIG)
        except (ValueError, TypeError) as e:
            raise GrowlmError(f"{d / GROWLM_CONFIG}: {e}") from None
        sd = _read_weights(d)
        if cfg.family != "custom" and any(k.startswith(("model.", "transformer.")) for k in sd):
            sd = state_dict_from_hf(sd, cfg)  # an HF export that also carries growlm_config.json
    elif (d / "config.json").exists():
        try:
            raw = json.loads((d / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise GrowlmError(f"{d / 'config.json'}: not valid JSON ({e})") from None
        try:
            cfg = config_from_hf(raw)
        except GrowlmError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise GrowlmError(f"{d / 'config.json'}: bad model configuration ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        sd = state_dict_from_hf(_read_weights(d), cfg)
    else:
        raise GrowlmError(f"{d}: not a model directory (no config.json or {GROWLM_CONFIG})")
    return _build(cfg, sd, dtype).eval(), _load_tokenizer(d)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[GPT, Any]:
    """Load a GGUF file through transformers' GGUF support (weights are dequantised)."""
    path = Path(path)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover
        raise GrowlmError(f"transformers is needed to read GGUF files ({e})") from None
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except GrowlmError:
        raise
    except Exception as e:  # noqa: BLE001 - gguf/transformers raise many types for bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GrowlmError(f"{path}: cannot load as a causal language model GGUF ({msg})") from None
    model = from_hf(hf).to(dtype).eval()
    return model, tok


def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from its GGUF once and cached as safetensors."""
    gguf = smollm2_gguf()
    d = cache_dir() / "models" / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if not (d / "model.safetensors").exists():
        model, tok = load_gguf(gguf)
        save_hf(model, d, tok)
    return d


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> tuple[GPT, Any]:
    """Load a model and its tokenizer from a preset name, a directory, a GGUF file or a hub id."""
    if spec in (DEFAULT_MODEL, "default"):
        return load_dir(default_model_dir(), dtype)
    p = Path(spec).expanduser()
    if p.is_dir():
        return load_dir(p, dtype)
    if p.is_file():
        if p.suffix == ".gguf":
            return load_gguf(p, dtype)
        raise GrowlmError(f"{p}: expected a model directory or a .gguf file")
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not spec.startswith((".", "/"))
    if not looks_like_hub_id:
        raise GrowlmError(f"{spec}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all mean "cannot fetch"
        raise GrowlmError(f"{spec}: not a local path and could not be fetched from the hub ({type(e).__name__})") from None
    return load_dir(Path(local), dtype)
