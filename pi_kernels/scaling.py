"""RoPE frequency tables, context-extension schemes and Position Interpolation (PI) for model configs.

RoPE rotates feature pair ``j`` of a query/key at position ``m`` by the angle ``m * theta_j`` with
``theta_j = base ** (-2j / rotary_dim)`` (the ``inv_freq`` table). A model trained on ``L`` positions has only seen
angles up to about ``L * theta_j``; running it on ``L' > L`` positions extrapolates to angles it never saw.
Position Interpolation (Chen et al., 2023, arXiv 2306.15595) squeezes the ``L'`` positions back into the trained
range instead: with ``s = L' / L`` the angle becomes ``theta_j * m * L / L' = (m / s) * theta_j``, which is the same
as dividing every frequency by ``s`` (:func:`linear_inv_freq`, rope type ``"linear"`` in Hugging Face configs).

Every static scheme (default, PI, YaRN, Llama 3, LongRoPE) reduces to an ``inv_freq`` table plus an attention factor
that multiplies cos/sin (:class:`RopeFrequencies`, :func:`rope_frequencies`); the formulas follow Hugging Face
``transformers`` (``modeling_rope_utils.py``) but are computed in float64. :func:`extend_context` rewrites a model
config (a dict or a duck-typed ``PretrainedConfig``) for PI extension to a new context length.
"""

import copy
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DEFAULT_ROPE_THETA",
    "SUPPORTED_ROPE_TYPES",
    "RopeFrequencies",
    "extend_context",
    "linear_inv_freq",
    "rope_frequencies",
    "rope_frequencies_from_config",
    "rope_inv_freq",
    "scaling_factor_for",
]

# Hugging Face's ``RotaryEmbeddingConfigMixin.default_theta``: the base used when a config names none.
DEFAULT_ROPE_THETA = 10000.0
# The one list of rope types this package computes (rope_frequencies); integrations take theirs from it.
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")
# Of those, the types whose table depends on the sequence length run at (longrope: short or long factors, from
# ``seq_len``), which a model patched once with one table cannot follow (integrations.transformers refuses them).
SEQ_LEN_DEPENDENT_ROPE_TYPES = ("longrope",)
# Rope types whose pre-training length lives in ``original_max_position_embeddings``.
_ORIGINAL_LENGTH_TYPES = ("yarn", "llama3", "longrope")


def _real(value: Any, name: str) -> float:
    """``value`` as a finite float; bools and strings are refused (TypeError) although ``float()`` takes them."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _positive(value: Any, name: str) -> float:
    out = _real(value, name)
    if out <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


def _integer(value: Any, name: str) -> int:
    """``value`` as an int; integer numpy/torch scalars pass, bools and floats (even ``8192.0``) raise TypeError."""
    # bool subclasses int, but a flag passed where a length is expected is a bug, not the length 0 or 1.
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None


def _length(value: Any, name: str) -> int:
    out = _integer(value, name)
    if out <= 0:
        raise ValueError(f"{name} must be a positive integer, got {out}")
    return out


def rope_inv_freq(base: float, rotary_dim: int, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """Standard RoPE inverse frequencies ``base ** (-(2j) / rotary_dim)`` for ``j = 0 .. rotary_dim / 2 - 1``.

    Parameters
    ----------
    base : float
        RoPE base (``rope_theta``), finite and > 1.
    rotary_dim : int
        Number of rotated features, positive and even.
    device : torch.device or str, optional
        Device of the result (default: CPU).
    dtype : torch.dtype, optional
        Dtype of the result; the table is always computed in float64 first.

    Returns
    -------
    Tensor, shape ``(rotary_dim // 2,)``
        Decreasing from 1.0 at ``j = 0``.

    Raises
    ------
    ValueError
        If ``base`` or ``rotary_dim`` is invalid (the message names the argument).

    Examples
    --------
    >>> rope_inv_freq(10000.0, 4)
    tensor([1.0000, 0.0100], dtype=torch.float64)
    """
    try:
        base = _real(base, "base")
        dim = _integer(rotary_dim, "rotary_dim")
    except TypeError as err:
        # Every bad argument is a ValueError here, as in the kernels' own argument checks (_validation.py).
        raise ValueError(str(err)) from None
    if base <= 1.0:
        raise ValueError(f"base must be > 1, got {base!r}")
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary_dim must be a positive even integer, got {dim}")
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    # Built on the CPU in float64 and cast once, so every device and dtype gets the same correctly rounded table.
    return torch.pow(base, -exponents).to(device=device, dtype=dtype)


def linear_inv_freq(inv_freq: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Position Interpolation as a frequency transform: ``inv_freq / scaling_factor``.

    PI evaluates position ``m`` at ``m / s``; since ``angle(m, j) = (m / s) * inv_freq[j] = m * (inv_freq[j] / s)``,
    dividing the frequencies is identical and leaves the kernels' position handling untouched.

    Parameters
    ----------
    inv_freq : Tensor, shape ``(rotary_dim // 2,)`` (any shape works)
        Unscaled inverse frequencies.
    scaling_factor : float
        ``s = L' / L``, finite and > 0.

    Returns
    -------
    Tensor, same shape and dtype as ``inv_freq``

    Examples
    --------
    >>> linear_inv_freq(rope_inv_freq(10000.0, 4), 2.0)  # trained on 4096 positions, run on 8192
    tensor([0.5000, 0.0050], dtype=torch.float64)
    """
    return inv_freq / _positive(scaling_factor, "scaling_factor")


# eq=False: the generated __eq__ would call bool() on a tensor comparison, which raises for more than one element.
@dataclass(frozen=True, eq=False)
class RopeFrequencies:
    """A RoPE frequency scheme: angles ``m * inv_freq[j]``, cos and sin multiplied by ``attention_factor``.

    Attributes
    ----------
    inv_freq : Tensor, float64, shape ``(rotary_dim // 2,)``
    attention_factor : float
        YaRN/LongRoPE "mscale"; 1.0 for default RoPE and PI.
    """

    inv_freq: torch.Tensor
    attention_factor: float = 1.0


def _declared_rope_type(entry: Mapping) -> str:
    """The rope type of a flat rope dict, read as Hugging Face does: ``rope_type``, then legacy ``type``."""
    rope_type = entry.get("rope_type", entry.get("type"))
    if rope_type is None:
        return "default"
    if not isinstance(rope_type, str):
        raise TypeError(f"rope_type must be a string, got {rope_type!r}")
    return rope_type


def _check_flat(entry: Any, name: str) -> dict:
    """A copy of a rope dict, refusing per-layer-type nesting such as ``{"full_attention": {...}, ...}``."""
    if entry is None:
        return {}
    if not isinstance(entry, Mapping):
        raise TypeError(f"{name} must be a dict (or None), got {type(entry).__name__}")
    nested = [key for key, value in entry.items() if isinstance(value, Mapping)]
    if nested:
        raise ValueError(f"{name} holds per-layer-type rope parameters ({', '.join(map(str, nested))}); only a "
                         f"single flat rope dict is supported")
    return dict(entry)


def _required(params: Mapping, key: str, rope_type: str) -> Any:
    if params.get(key) is None:
        raise ValueError(f"rope type {rope_type!r} needs {key!r} in the rope parameters")
    return params[key]


def _original_length(params: Mapping, max_position_embeddings: Any, rope_type: str) -> int:
    # Hugging Face falls back to max_position_embeddings when the rope dict does not record the pre-training length.
    value = params.get("original_max_position_embeddings")
    if value is None:
        value = max_position_embeddings
    if value is None:
        raise ValueError(f"rope type {rope_type!r} needs original_max_position_embeddings in the rope parameters "
                         f"or max_position_embeddings")
    return _length(value, "original_max_position_embeddings")


def _factor_or_ratio(params: Mapping, max_position_embeddings: Any, original: int, rope_type: str) -> float:
    factor = params.get("factor")
    if factor is not None:
        return _positive(factor, "factor")
    # DeepSeek-V3 (yarn) and Phi-3 (longrope) configs omit factor and imply it from the two lengths.
    if max_position_embeddings is None:
        raise ValueError(f"rope type {rope_type!r} needs factor or max_position_embeddings to derive it")
    return _length(max_position_embeddings, "max_position_embeddings") / original


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_correction_dim(rotations: float, dim: int, base: float, length: int) -> float:
    """Pair index whose wavelength ``2 pi base**(2i/dim)`` fits ``rotations`` full turns into ``length`` positions."""
    return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))


def _yarn(params: Mapping, inv_freq: torch.Tensor, base: float, dim: int, max_pos: Any) -> RopeFrequencies:
    original = _original_length(params, max_pos, "yarn")
    factor = _factor_or_ratio(params, max_pos, original, "yarn")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        # Truthiness as in Hugging Face: a zero or missing mscale falls back to the paper's 0.1 ln(s) + 1.
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = _positive(params.get("beta_fast") or 32.0, "beta_fast")
    beta_slow = _positive(params.get("beta_slow") or 1.0, "beta_slow")
    low = _yarn_correction_dim(beta_fast, dim, base, original)
    high = _yarn_correction_dim(beta_slow, dim, base, original)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0.0, 1.0)
    # ramp 0: fast pairs that turn many times within L keep their frequency (extrapolate); ramp 1: slow pairs are
    # interpolated as in PI; pairs in between blend linearly.
    inv = inv_freq * (1.0 - ramp) + (inv_freq / factor) * ramp
    return RopeFrequencies(inv, _positive(attention_factor, "attention_factor"))


def _llama3(params: Mapping, inv_freq: torch.Tensor, max_pos: Any) -> RopeFrequencies:
    factor = _positive(_required(params, "factor", "llama3"), "factor")
    low_freq_factor = _positive(_required(params, "low_freq_factor", "llama3"), "low_freq_factor")
    high_freq_factor = _positive(_required(params, "high_freq_factor", "llama3"), "high_freq_factor")
    if high_freq_factor <= low_freq_factor:
        raise ValueError(f"llama3 needs high_freq_factor > low_freq_factor, got {high_freq_factor} and "
                         f"{low_freq_factor}")
    original = _original_length(params, max_pos, "llama3")
    wavelen = 2 * math.pi / inv_freq
    # Wavelengths longer than original / low_freq_factor are interpolated (PI), shorter than
    # original / high_freq_factor kept; in between the two are blended by how many turns fit into `original`.
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    inv = torch.where(wavelen > original / low_freq_factor, inv_freq / factor, blended)
    inv = torch.where(wavelen < original / high_freq_factor, inv_freq, inv)
    return RopeFrequencies(inv, 1.0)


def _longrope(params: Mapping, inv_freq: torch.Tensor, max_pos: Any, seq_len: Any) -> RopeFrequencies:
    original = _original_length(params, max_pos, "longrope")
    factor = _factor_or_ratio(params, max_pos, original, "longrope")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    rescale = {}
    for key in ("short_factor", "long_factor"):
        values = torch.as_tensor(_required(params, key, "longrope"), dtype=torch.float64)
        if values.shape != inv_freq.shape or not (torch.isfinite(values) & (values > 0)).all():
            raise ValueError(f"longrope {key} must hold rotary_dim // 2 = {inv_freq.shape[0]} finite numbers > 0, "
                             f"got shape {tuple(values.shape)}")
        rescale[key] = values
    # Like Hugging Face, the long factors apply only once the sequence outgrows the pre-training length.
    long = seq_len is not None and _length(seq_len, "seq_len") > original
    inv = inv_freq / rescale["long_factor" if long else "short_factor"]
    return RopeFrequencies(inv, _positive(attention_factor, "attention_factor"))


def rope_frequencies(rope_parameters: Mapping | None, head_dim_or_rotary_dim: int, *, max_position_embeddings=None,
                     rope_theta=None, seq_len=None, device=None) -> RopeFrequencies:
    """Inverse frequencies and attention factor of a Hugging Face rope dict, in float64.

    Matches ``transformers``' ``ROPE_INIT_FUNCTIONS`` for the static rope types ``"default"``, ``"linear"`` (PI),
    ``"yarn"``, ``"llama3"`` and ``"longrope"``.

    Parameters
    ----------
    rope_parameters : dict or None
        transformers-5 ``rope_parameters`` (``{"rope_type": ..., "rope_theta": ..., "factor": ..., ...}``) or a legacy
        ``rope_scaling`` dict (``"type"`` accepted for ``"rope_type"``); None or ``{}`` means default RoPE.
    head_dim_or_rotary_dim : int
        Head dimension; the rotary dimension is ``int(head_dim * partial_rotary_factor)`` when the dict holds a
        ``partial_rotary_factor`` (so pass the head dim then), else this value itself.
    max_position_embeddings : int, optional
        The config's ``max_position_embeddings``: the fallback for a missing ``original_max_position_embeddings``
        (yarn, llama3, longrope) and, over the original length, the factor of yarn/longrope dicts without one.
    rope_theta : float, optional
        Base for legacy dicts that keep ``rope_theta`` at the config's top level; a ``rope_theta`` in the dict wins,
        and :data:`DEFAULT_ROPE_THETA` is used when neither is given.
    seq_len : int, optional
        Only for longrope: ``long_factor`` is used when ``seq_len > original_max_position_embeddings``, else
        ``short_factor`` (as Hugging Face does at initialisation).
    device : torch.device or str, optional
        Device of ``inv_freq``.

    Returns
    -------
    RopeFrequencies
        ``inv_freq`` float64 of shape ``(rotary_dim // 2,)`` and ``attention_factor``.

    Raises
    ------
    ValueError
        For ``"dynamic"`` (its frequencies change with the running sequence length), an unknown rope type (the
        message lists :data:`SUPPORTED_ROPE_TYPES`), per-layer-type nested dicts, or missing/invalid parameters.
    TypeError
        For a parameter of the wrong type (a non-dict ``rope_parameters``, a non-integer dimension, ...).

    Examples
    --------
    >>> freqs = rope_frequencies({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
    ...                           "original_max_position_embeddings": 4096}, 64)
    >>> freqs.inv_freq.shape, round(freqs.attention_factor, 4)
    (torch.Size([32]), 1.1386)
    """
    params = _check_flat(rope_parameters, "rope_parameters")
    rope_type = _declared_rope_type(params)
    if rope_type == "dynamic":
        raise ValueError("rope type 'dynamic' (dynamic NTK) has no static frequency table: it depends on the sequence "
                         "length at run time")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unknown rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    base = params.get("rope_theta")
    if base is None:
        base = DEFAULT_ROPE_THETA if rope_theta is None else rope_theta
    base = _real(base, "rope_theta")
    dim = _integer(head_dim_or_rotary_dim, "head_dim_or_rotary_dim")
    partial = params.get("partial_rotary_factor")
    if partial is not None:
        dim = int(dim * _positive(partial, "partial_rotary_factor"))
    inv_freq = rope_inv_freq(base, dim)
    if rope_type == "default":
        freqs = RopeFrequencies(inv_freq)
    elif rope_type == "linear":
        freqs = RopeFrequencies(linear_inv_freq(inv_freq, _required(params, "factor", "linear")))
    elif rope_type == "yarn":
        freqs = _yarn(params, inv_freq, base, dim, max_position_embeddings)
    elif rope_type == "llama3":
        freqs = _llama3(params, inv_freq, max_position_embeddings)
    else:
        freqs = _longrope(params, inv_freq, max_position_embeddings, seq_len)
    return RopeFrequencies(freqs.inv_freq.to(device), freqs.attention_factor)


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _set(config: Any, key: str, value: Any) -> None:
    if isinstance(config, Mapping):
        config[key] = value
    else:
        setattr(config, key, value)


def _has(config: Any, key: str) -> bool:
    return key in config if isinstance(config, Mapping) else hasattr(config, key)


def _rope_entry(config: Any) -> tuple[str, dict]:
    """Where a config keeps its rope dict (``"rope_parameters"`` or legacy ``"rope_scaling"``) and a flat copy."""
    if _has(config, "rope_parameters"):
        entry = _get(config, "rope_parameters")
        legacy = _get(config, "rope_scaling")
        # transformers 5 aliases rope_scaling to rope_parameters; a different rope_scaling would win when the config
        # is loaded, so rewriting rope_parameters alone could be silently ignored.
        if legacy is not None and legacy != entry:
            raise ValueError("config has both rope_parameters and a different rope_scaling; keep only one")
        return "rope_parameters", _check_flat(entry, "rope_parameters")
    if _has(config, "rope_scaling") or _has(config, "rope_theta"):
        return "rope_scaling", _check_flat(_get(config, "rope_scaling"), "rope_scaling")
    return "rope_parameters", {}


def _base_length(config: Any, entry: Mapping, rope_type: str) -> int:
    """Trained context length L that PI scales from."""
    if rope_type == "default":
        length = _get(config, "max_position_embeddings")
        if length is None:
            raise ValueError("config has no max_position_embeddings, so its trained context length is unknown")
        return _length(length, "max_position_embeddings")
    if rope_type == "linear":
        original = entry.get("original_max_position_embeddings")
        if original is None:
            raise ValueError(f"config is already linearly scaled (factor={entry.get('factor')!r}) but records no "
                             f"original_max_position_embeddings, so its trained context length is unknown")
        return _length(original, "original_max_position_embeddings")
    raise ValueError(f"config is already scaled with rope type {rope_type!r}; linear (PI) extension only applies to "
                     f"default or linear RoPE")


def scaling_factor_for(config: Any) -> float:
    """Linear (PI) scaling factor ``s = L' / L`` of a config: 1.0 for default RoPE.

    Parameters
    ----------
    config : dict or object
        Model config with ``rope_parameters`` or legacy ``rope_scaling`` (key or attribute).

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If the config uses another rope type or a linear entry has no valid ``factor``.
    """
    _, entry = _rope_entry(config)
    rope_type = _declared_rope_type(entry)
    if rope_type == "default":
        return 1.0
    if rope_type != "linear":
        raise ValueError(f"config uses rope type {rope_type!r}, not linear (PI) scaling")
    return _positive(_required(entry, "factor", "linear"), "factor")


def extend_context(config: Any, new_max_position_embeddings: int) -> Any:
    """Updated copy of a model config that runs at ``L'`` positions with Position Interpolation.

    The trained length ``L`` is ``max_position_embeddings``, or ``original_max_position_embeddings`` of a config that
    is already linearly scaled (it is re-extended from the original length, not stacked). The copy gets
    ``max_position_embeddings = L'`` and a linear rope entry with ``factor = L' / L``:

    * transformers-5 style (the config has ``rope_parameters``, or no rope field at all):
      ``rope_parameters = {"rope_type": "linear", "rope_theta": <kept, default 10000.0>, "factor": L'/L,
      "original_max_position_embeddings": L}``, keeping ``partial_rotary_factor`` if the old dict had one;
    * legacy style (a ``rope_scaling`` field, even None, or a top-level ``rope_theta``): ``rope_scaling =
      {"rope_type": "linear", "type": "linear", "factor": L'/L, "original_max_position_embeddings": L}``.

    Parameters
    ----------
    config : dict or object
        A dict (e.g. a parsed ``config.json``) or a ``PretrainedConfig``-like object, read by attribute. Never
        modified: dicts are deep-copied into a new dict, objects with ``copy.deepcopy``.
    new_max_position_embeddings : int
        ``L' >= L``; integer numpy/torch scalars are accepted, bools and floats are not.

    Returns
    -------
    dict or object
        The updated copy, of the same kind as ``config``.

    Raises
    ------
    TypeError
        If ``new_max_position_embeddings`` is not an integer or a rope field is not a dict.
    ValueError
        If ``L' <= 0`` or ``L' < L``; ``L`` is unknown (no ``max_position_embeddings``, or a linear entry without
        ``original_max_position_embeddings``); the config is scaled with another rope type (yarn, llama3, dynamic,
        longrope, ...); its rope parameters are nested per layer type; or it has conflicting rope fields.

    Examples
    --------
    >>> config = {"max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None}
    >>> extend_context(config, 16384)["rope_scaling"]
    {'rope_type': 'linear', 'type': 'linear', 'factor': 4.0, 'original_max_position_embeddings': 4096}
    """
    new_length = _length(new_max_position_embeddings, "new_max_position_embeddings")
    key, entry = _rope_entry(config)
    base_length = _base_length(config, entry, _declared_rope_type(entry))
    if new_length < base_length:
        raise ValueError(f"new_max_position_embeddings ({new_length}) is shorter than the trained context length "
                         f"({base_length}); PI only extends")
    factor = new_length / base_length
    if key == "rope_parameters":
        theta = entry.get("rope_theta")
        if theta is None:
            theta = _get(config, "rope_theta")
        new_entry = {"rope_type": "linear", "rope_theta": DEFAULT_ROPE_THETA if theta is None else theta,
                     "factor": factor, "original_max_position_embeddings": base_length}
        if "partial_rotary_factor" in entry:
            new_entry["partial_rotary_factor"] = entry["partial_rotary_factor"]
    else:
        new_entry = {"rope_type": "linear", "type": "linear", "factor": factor,
                     "original_max_position_embeddings": base_length}

    # A dict copy stays a plain dict (any Mapping in, dict out); objects keep their class.
    out = copy.deepcopy(dict(config)) if isinstance(config, Mapping) else copy.deepcopy(config)
    _set(out, "max_position_embeddings", new_length)
    _set(out, key, new_entry)
    # A rope_scaling that mirrored rope_parameters (accepted by _rope_entry) must not keep the old scheme.
    if key == "rope_parameters" and _get(out, "rope_scaling") not in (None, new_entry):
        _set(out, "rope_scaling", dict(new_entry))
    return out


def rope_frequencies_from_config(config: Any, *, seq_len=None, device=None) -> RopeFrequencies:
    """:func:`rope_frequencies` for a whole model config (a dict or a ``PretrainedConfig``-like object).

    Reads the rope dict (``rope_parameters`` or legacy ``rope_scaling``), ``rope_theta``, ``partial_rotary_factor``,
    ``max_position_embeddings``, a top-level ``original_max_position_embeddings`` (Phi-3 style) and the head dim
    (``head_dim``, else ``hidden_size // num_attention_heads``), with Hugging Face's precedence.

    Parameters
    ----------
    config : dict or object
    seq_len : int, optional
        Forwarded to :func:`rope_frequencies` (longrope only).
    device : torch.device or str, optional

    Returns
    -------
    RopeFrequencies
        ``inv_freq`` float64 of shape ``(rotary_dim // 2,)`` and ``attention_factor``.
    """
    _, params = _rope_entry(config)
    # Hugging Face lets the top-level partial_rotary_factor and original length override the rope dict.
    partial = _get(config, "partial_rotary_factor")
    if partial is not None:
        params["partial_rotary_factor"] = partial
    original = _get(config, "original_max_position_embeddings")
    if original is not None and _declared_rope_type(params) in _ORIGINAL_LENGTH_TYPES:
        params["original_max_position_embeddings"] = original
    head_dim = _get(config, "head_dim")
    if head_dim is None:
        hidden_size, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        if hidden_size is None or heads is None:
            raise ValueError("config needs head_dim, or hidden_size and num_attention_heads")
        head_dim = _length(hidden_size, "hidden_size") // _length(heads, "num_attention_heads")
    return rope_frequencies(params, head_dim, max_position_embeddings=_get(config, "max_position_embeddings"),
                            rope_theta=_get(config, "rope_theta"), seq_len=seq_len, device=device)
