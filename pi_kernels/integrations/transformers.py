"""Swap pi_kernels into Hugging Face ``transformers`` 5.x models of the Llama family.

:func:`patch_model` replaces, on each attention layer instance, the ``forward`` of the model's own attention class by
one that matches it line for line except where RoPE happens: instead of ``apply_rotary_pos_emb(q, k, cos, sin)``
with the model's float32 cos/sin table, q and k are rotated by :func:`pi_kernels.rotary_interp` at the layer's
``position_ids``, with the frequencies of the model's own rope configuration computed in float64. The projections,
per-head norms, KV cache, attention backend (``eager``, ``sdpa``, flash, flex, paged), sliding window and output
projection are the model's. :func:`unpatch_model` deletes the instance attribute, so the class forward is back.

Covered attention classes (:data:`SUPPORTED_ATTENTION_CLASSES`, all sharing the Llama attention shape: separate q/k/v
projections, rotate-half RoPE over the whole head, GQA): Llama, Mistral, Ministral, Qwen2, Qwen2-MoE, Qwen3,
Qwen3-MoE (per-head q/k norms before RoPE), Gemma and Granite. Anything else is refused, never half patched.

Rope types (``config.rope_parameters``, legacy ``rope_scaling``): ``default`` and ``linear`` (Position
Interpolation) are passed to the kernel as ``base`` and ``scaling_factor``, exactly; ``yarn`` and ``llama3`` go
through their ``inv_freq`` table, and YaRN's attention factor (HF multiplies cos and sin by it) multiplies the rotated
q and k. ``dynamic`` and ``longrope`` (their frequencies change with the sequence length at run time), per-layer-type
rope dicts and unknown types are refused with an error.
"""

import inspect
import math
import re
import sys
import types
from dataclasses import dataclass, field

import torch
import transformers
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import pi_kernels

from .. import parallel, scaling

__all__ = ["SUPPORTED_ATTENTION_CLASSES", "SUPPORTED_ROPE_TYPES", "disable_context_parallel",
           "enable_context_parallel", "is_patched", "patch_model", "unpatch_model"]


def _check_transformers_version(version):
    """Refuse a transformers older than the attention forward that :func:`patch_model` mirrors, naming the version.

    From 5.4 the attention modules hand the KV cache no ``cache_position``; 5.0-5.3's take it as an argument of
    their own and pass it to the cache and the attention backend, which the patched forward does not.
    """
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or tuple(map(int, found.groups())) < (5, 4):
        raise ImportError(f"pi_kernels.integrations.transformers needs transformers >= 5.4 (found {version}): "
                          "pip install 'transformers>=5.4,<6'")


_check_transformers_version(transformers.__version__)


@dataclass(frozen=True)
class _Family:
    """What an attention class does besides the Llama forward."""

    head_norm: bool = False            # q_norm / k_norm on each (token, head) before RoPE, as in Qwen3
    sliding_window: str | None = None  # source of the attention call's sliding_window: "attribute" or "config"


_FAMILIES = {
    "LlamaAttention": _Family(),
    "MistralAttention": _Family(sliding_window="config"),
    "MinistralAttention": _Family(sliding_window="attribute"),
    "Qwen2Attention": _Family(sliding_window="attribute"),
    "Qwen2MoeAttention": _Family(),
    "Qwen3Attention": _Family(head_norm=True, sliding_window="attribute"),
    "Qwen3MoeAttention": _Family(head_norm=True, sliding_window="attribute"),
    "GemmaAttention": _Family(),
    "GraniteAttention": _Family(),
}
SUPPORTED_ATTENTION_CLASSES = tuple(_FAMILIES)
# scaling's rope types whose table is fixed: patch_model computes one table per model.
SUPPORTED_ROPE_TYPES = tuple(rope_type for rope_type in scaling.SUPPORTED_ROPE_TYPES
                             if rope_type not in scaling.SEQ_LEN_DEPENDENT_ROPE_TYPES)
_PATCH_ATTRIBUTE = "_pi_kernels_patch"


@dataclass
class _Rope:
    """The model's RoPE as rotary_interp arguments: (base, scaling_factor) for default/linear, else inv_freq."""

    rope_type: str
    base: float
    scaling_factor: float
    inv_freq: torch.Tensor | None      # float64 (head_dim // 2,), only for yarn and llama3
    attention_factor: float
    _inv_freq_on: dict = field(default_factory=dict)

    def kernel_kwargs(self, device):
        if self.inv_freq is None:
            return {"base": self.base, "scaling_factor": self.scaling_factor}
        # The table follows the model to whatever device it runs on; one copy per device.
        table = self._inv_freq_on.get(device)
        if table is None:
            table = self._inv_freq_on[device] = self.inv_freq.to(device)
        return {"inv_freq": table}


@dataclass
class _AttentionPatch:
    """Per-layer state of a patched attention module."""

    family: _Family
    rope: _Rope
    rotary: bool
    attention: bool
    qkv: bool
    eager_attention: object   # the modeling module's eager_attention_forward, HF's default interface
    original_forward: object  # the class forward, run when no pi_kernels op applies (rotary=False)
    context_parallel: "_ContextParallel | None" = None  # set by enable_context_parallel


def _rope_of(model, head_dims):
    """Read the model's rotary embedding and config into a :class:`_Rope`, refusing what we cannot run exactly."""
    rotary_embs = [module for module in model.modules() if type(module).__name__.endswith("RotaryEmbedding")]
    if len(rotary_embs) != 1:
        raise ValueError(f"patch_model expects one rotary embedding module in the model, found {len(rotary_embs)}")
    rotary_emb = rotary_embs[0]
    config = getattr(rotary_emb, "config", None)
    if config is None:
        config = model.config
    rope_type = getattr(rotary_emb, "rope_type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported by patch_model (supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}); 'dynamic' and 'longrope' change their frequencies with "
                         f"the sequence length at run time")
    try:
        freqs = scaling.rope_frequencies_from_config(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot read the model's rope configuration: {err}") from err
    n_pairs = freqs.inv_freq.numel()
    if any(head_dim != 2 * n_pairs for head_dim in head_dims):
        raise ValueError(f"patch_model rotates whole heads, but the rope configuration rotates {2 * n_pairs} features "
                         f"of heads of {sorted(head_dims)} (partial_rotary_factor is not used by these models)")
    # The buffer is what the unpatched model really uses: a config edited after the model was built, or a
    # hand-modified table, would otherwise be silently replaced by other frequencies.
    buffer = rotary_emb.inv_freq.detach()
    if buffer.shape != freqs.inv_freq.shape:
        raise ValueError(f"the model's rotary inv_freq buffer has shape {tuple(buffer.shape)}; its config's rope "
                         f"parameters give {tuple(freqs.inv_freq.shape)}")
    tolerance = max(1e-5, torch.finfo(buffer.dtype).eps)
    mismatch = ((buffer.double().cpu() - freqs.inv_freq).abs() / freqs.inv_freq).max().item()
    if mismatch > tolerance:
        raise ValueError(f"the model's rotary inv_freq buffer does not match its config's rope parameters "
                         f"(relative difference {mismatch:.2e}); rebuild the model from its config")
    attention_scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))
    if not math.isclose(attention_scaling, freqs.attention_factor, rel_tol=1e-6):
        raise ValueError(f"the model's rotary attention_scaling {attention_scaling} does not match its config's "
                         f"attention factor {freqs.attention_factor}")
    params = config.rope_parameters
    if rope_type in ("default", "linear"):
        return _Rope(rope_type, float(params["rope_theta"]), scaling.scaling_factor_for(config), None, 1.0)
    return _Rope(rope_type, float(params["rope_theta"]), 1.0, freqs.inv_freq, freqs.attention_factor)


def _attention_modules(model):
    """Every attention module of the model; all of them must be of a supported class."""
    found = [module for module in model.modules() if type(module).__name__.endswith("Attention")]
    unsupported = sorted({type(module).__name__ for module in found
                          if type(module).__name__ not in _FAMILIES
                          or not type(module).__module__.startswith("transformers.models.")})
    if not found or unsupported:
        what = f"unsupported attention classes {unsupported}" if unsupported else "no attention module"
        raise ValueError(f"patch_model found {what}; supported: {', '.join(SUPPORTED_ATTENTION_CLASSES)}")
    return found


def _check_flag(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def patch_model(model, *, rotary=True, attention=False, qkv=False):
    """Route the attention of a transformers 5.x Llama-family model through pi_kernels ops, in place.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A loaded model (``...ForCausalLM`` or the bare ``...Model``) whose attention classes are all in
        :data:`SUPPORTED_ATTENTION_CLASSES`, with one rotary embedding whose rope type is in
        :data:`SUPPORTED_ROPE_TYPES`. Patch before wrapping with hooks that replace ``forward`` (accelerate's
        ``device_map`` dispatch) and before ``torch.compile``.
    rotary : bool
        Rotate q and k with :func:`pi_kernels.rotary_interp` wherever RoPE is not fused into another op. With
        ``rotary=False`` (only together with ``attention=True``), layer calls the fused attention cannot take run the
        model's own forward.
    attention : bool
        Fuse RoPE into :func:`pi_kernels.attention_rotary` for the calls it covers: causal attention with no
        attention mask (``sdpa`` without padding), no KV cache, no dropout and no sliding window; other calls fall
        back to ``rotary`` (or the model's forward). Needs an attention op in this build of pi_kernels.
    qkv : bool
        Compute q, k, v with :func:`pi_kernels.qkv_proj_rotary` (RoPE in the projection's epilogue). Not with
        ``attention``, nor with per-head q/k norms (Qwen3), which sit between projection and RoPE.

    Returns
    -------
    model
        The same object, patched.

    Raises
    ------
    ValueError
        Unsupported attention class or rope configuration, an already patched model, conflicting flags.
    NotImplementedError
        ``attention=True`` or ``qkv=True`` when pi_kernels has no such op yet.

    Examples
    --------
    >>> model = transformers.AutoModelForCausalLM.from_pretrained("path/to/llama", dtype=torch.bfloat16).cuda()
    >>> patch_model(model)  # RoPE now runs in pi_kernels.rotary_interp, PI scaling from model.config
    >>> loss = model(input_ids, labels=input_ids).loss
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a transformers model (torch.nn.Module), got {type(model).__name__}")
    for value, name in ((rotary, "rotary"), (attention, "attention"), (qkv, "qkv")):
        _check_flag(value, name)
    if not (rotary or attention or qkv):
        raise ValueError("nothing to patch: pass rotary=True, attention=True or qkv=True")
    if attention and qkv:
        raise ValueError("attention=True and qkv=True both apply RoPE; choose one")
    for flag, op in ((attention, "attention_rotary"), (qkv, "qkv_proj_rotary")):
        if flag and not hasattr(pi_kernels, op):
            raise NotImplementedError(f"{'attention' if op == 'attention_rotary' else 'qkv'}=True needs "
                                      f"pi_kernels.{op}, which this version of pi_kernels does not have yet")
    if int(transformers.__version__.split(".")[0]) != 5:
        raise ValueError(f"patch_model mirrors the attention forward of transformers 5.x; found "
                         f"{transformers.__version__}")
    modules = _attention_modules(model)
    for module in modules:
        if hasattr(module, _PATCH_ATTRIBUTE):
            raise ValueError("the model is already patched; call unpatch_model first")
        if "forward" in vars(module):
            raise ValueError(f"{type(module).__name__} already has an instance-level forward (a hook or another "
                             f"patch); patch the model before wrapping it")
    rope = _rope_of(model, {module.head_dim for module in modules})
    patches = []
    for module in modules:
        family = _FAMILIES[type(module).__name__]
        if qkv and family.head_norm:
            raise ValueError(f"qkv=True cannot serve {type(module).__name__}: its per-head q/k norms run between "
                             f"the projection and RoPE")
        if qkv and len({proj.bias is None for proj in (module.q_proj, module.k_proj, module.v_proj)}) != 1:
            raise ValueError("qkv=True needs q_proj, k_proj and v_proj all with or all without bias")
        eager_attention = sys.modules[type(module).__module__].eager_attention_forward
        patches.append(_AttentionPatch(family, rope, rotary, attention, qkv, eager_attention, type(module).forward))
    # Only now, with every check passed, is any module touched: a refused model is left as it was.
    for module, patch in zip(modules, patches, strict=True):
        setattr(module, _PATCH_ATTRIBUTE, patch)
        module.forward = types.MethodType(_patched_forward, module)
    return model


@dataclass
class _ContextParallel:
    group: object                     # the torch.distributed group the sequence is sharded across
    attn_implementation: str          # the model's own, restored by disable_context_parallel
    position_check: object            # handle of the model's forward pre-hook _require_position_ids


_CONTEXT_PARALLEL_IMPLEMENTATION = "pi_kernels_context_parallel"


def _context_parallel_mask(*, attention_mask=None, **_):
    """HF mask builder under context parallelism: no mask (the shards' positions are not contiguous, which HF
    would take for packed sequences); the causal mask is applied by the attention itself."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("context-parallel attention takes no padding mask: pass attention_mask=None (or all ones)")


def _context_parallel_unfused(module, *args, **kwargs):
    """The HF attention interface under context parallelism, reached only by calls the fused op cannot take."""
    raise ValueError("context-parallel attention runs without KV cache (use_cache=False), attention dropout, "
                     "sliding window or packed sequences (cu_seq_lens_q)")


def _require_position_ids(model, args, kwargs):
    """Forward pre-hook: without ``position_ids`` HF would number a shard's tokens 0..seq/W−1, the wrong positions."""
    if inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments.get("position_ids") is None:
        raise ValueError("a context-parallel model needs position_ids: this rank's positions in the whole sequence, "
                         "pi_kernels.parallel.context_parallel_positions(seq_len, group)[None]")


def _patches(model):
    return [getattr(module, _PATCH_ATTRIBUTE) for module in model.modules() if hasattr(module, _PATCH_ATTRIBUTE)]


def enable_context_parallel(model, group=None):
    """Make a model patched with ``attention=True`` attend over a sequence sharded across ``group``.

    Every attention layer then calls :func:`pi_kernels.parallel.context_parallel_attention_rotary`: the model takes
    this rank's shard of the tokens (:func:`pi_kernels.parallel.context_parallel_shard` on dim 1) with their
    positions in the whole sequence as ``position_ids`` (:func:`pi_kernels.parallel.context_parallel_positions`,
    shape (1 or batch, seq / W)), and returns this rank's rows. Everything else in the model is per token.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model patched by :func:`patch_model` with ``attention=True``.
    group : ProcessGroup, optional
        The context-parallel group; default: the default process group.

    Returns
    -------
    model
        The same object. Its ``attn_implementation`` is switched to one that builds no mask (HF would otherwise
        read the shard's non-contiguous positions as packed sequences); :func:`disable_context_parallel` restores it.
        Calling it without ``position_ids`` is an error (HF's default, 0..seq/W−1, is wrong for a shard), and so is
        a KV cache: pass ``use_cache=False``.

    Raises
    ------
    ValueError
        The model is not patched with ``attention=True``, or context parallelism is already on.

    Examples
    --------
    >>> patch_model(model, attention=True)
    >>> enable_context_parallel(model, cp_group)
    >>> ids = pi_kernels.parallel.context_parallel_shard(input_ids, 1, cp_group)
    >>> positions = pi_kernels.parallel.context_parallel_positions(input_ids.shape[1], cp_group, device=ids.device)
    >>> logits = model(ids, position_ids=positions[None], use_cache=False).logits  # this rank's tokens
    """
    patches = _patches(model)
    if not patches or not all(patch.attention for patch in patches):
        raise ValueError("enable_context_parallel needs a model patched with patch_model(model, attention=True)")
    if patches[0].context_parallel is not None:
        raise ValueError("context parallelism is already enabled on this model")
    AttentionInterface.register(_CONTEXT_PARALLEL_IMPLEMENTATION, _context_parallel_unfused)
    AttentionMaskInterface.register(_CONTEXT_PARALLEL_IMPLEMENTATION, _context_parallel_mask)
    state = _ContextParallel(group, model.config._attn_implementation,
                             model.register_forward_pre_hook(_require_position_ids, with_kwargs=True))
    model.set_attn_implementation(_CONTEXT_PARALLEL_IMPLEMENTATION)
    for patch in patches:
        patch.context_parallel = state
    return model


def disable_context_parallel(model):
    """Undo :func:`enable_context_parallel`: single-process attention and the model's attention implementation."""
    patches = _patches(model)
    if not patches or patches[0].context_parallel is None:
        raise ValueError("context parallelism is not enabled on this model")
    model.set_attn_implementation(patches[0].context_parallel.attn_implementation)
    patches[0].context_parallel.position_check.remove()
    for patch in patches:
        patch.context_parallel = None
    return model


def unpatch_model(model):
    """Undo :func:`patch_model`: every attention layer runs its class forward again. Returns the model.

    Raises
    ------
    ValueError
        If the model is not patched.
    """
    modules = [module for module in model.modules() if hasattr(module, _PATCH_ATTRIBUTE)]
    if not modules:
        raise ValueError("the model is not patched by pi_kernels")
    if getattr(modules[0], _PATCH_ATTRIBUTE).context_parallel is not None:
        disable_context_parallel(model)
    for module in modules:
        delattr(module, _PATCH_ATTRIBUTE)
        del module.forward
    return model


def is_patched(model):
    """Whether :func:`patch_model` has patched ``model``."""
    return any(hasattr(module, _PATCH_ATTRIBUTE) for module in model.modules())


def _sliding_window_kwargs(module, family):
    if family.sliding_window == "attribute":
        return {"sliding_window": module.sliding_window}
    if family.sliding_window == "config":
        return {"sliding_window": getattr(module.config, "sliding_window", None)}
    return {}


def _fusable_attention(module, family, attention_mask, past_key_values, kwargs):
    """Whether attention_rotary computes exactly what the model's attention call would."""
    sliding_window = _sliding_window_kwargs(module, family).get("sliding_window")
    return (attention_mask is None and past_key_values is None and kwargs.get("cache") is None
            and "cu_seq_lens_q" not in kwargs and sliding_window is None
            and not (module.training and module.attention_dropout > 0))


def _qkv_inputs(module, hidden_states):
    """Input, concatenated weight and bias for qkv_proj_rotary; autograd reaches the original weights.

    Under autocast they are cast as autocast casts nn.Linear's operands, which a custom op does not get by itself.
    """
    projections = (module.q_proj, module.k_proj, module.v_proj)
    weight = torch.cat([proj.weight for proj in projections])
    bias = None if module.q_proj.bias is None else torch.cat([proj.bias for proj in projections])
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden_states, weight = hidden_states.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return hidden_states, weight, bias


def _patched_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                     **kwargs):
    """The Llama-family attention forward with RoPE by pi_kernels (``self`` is the attention module)."""
    patch = getattr(self, _PATCH_ATTRIBUTE)
    # transformers 5.24 renamed the KV cache argument past_key_values to cache, whose update takes the call's kwargs.
    named_cache = "cache" in kwargs
    if named_cache:
        past_key_values = kwargs.pop("cache")
    fused_attention = patch.attention and _fusable_attention(self, patch.family, attention_mask, past_key_values,
                                                             kwargs)
    if not (patch.rotary or patch.qkv or fused_attention):
        return patch.original_forward(self, hidden_states, position_embeddings=position_embeddings,
                                      attention_mask=attention_mask,
                                      **{"cache" if named_cache else "past_key_values": past_key_values}, **kwargs)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError(f"{type(self).__name__} patched by pi_kernels needs the position_ids that the decoder layer "
                         f"passes to it; got none")
    rope = patch.rope.kernel_kwargs(hidden_states.device)
    attention_factor = patch.rope.attention_factor
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    if patch.qkv:
        query, key, value = pi_kernels.qkv_proj_rotary(
            *_qkv_inputs(self, hidden_states), num_heads=self.q_proj.out_features // self.head_dim,
            num_kv_heads=self.k_proj.out_features // self.head_dim, head_dim=self.head_dim, positions=position_ids,
            **rope)
    else:
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        value = self.v_proj(hidden_states).view(hidden_shape)
        if patch.family.head_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        if fused_attention:
            # HF scales cos and sin, hence q and k, by the attention factor: the logits by its square.
            options = {"causal": True, "softmax_scale": self.scaling * attention_factor**2, **rope}
            if patch.context_parallel is None:
                out = pi_kernels.attention_rotary(query, key, value, position_ids, **options)
            else:
                out = parallel.context_parallel_attention_rotary(query, key, value, position_ids,
                                                                 group=patch.context_parallel.group, **options)
            return self.o_proj(out.reshape(*input_shape, -1)), None
        query, key = pi_kernels.rotary_interp(query, key, position_ids, **rope)
    if attention_factor != 1.0:
        query, key = query * attention_factor, key * attention_factor

    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx, **({"kwargs": kwargs} if named_cache else {}))
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                patch.eager_attention)
    attn_output, attn_weights = attention_interface(
        self, query, key, value, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling, **_sliding_window_kwargs(self, patch.family), **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights
