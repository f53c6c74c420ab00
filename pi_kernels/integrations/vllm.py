"""vLLM general plugin: vLLM's rotary layers computed by pi_kernels, with exact angles instead of a float32 cache.

vLLM builds its rotary layers with ``get_rope`` and applies them through a ``(max_position, rotary_dim)`` cos/sin
cache computed in float32, whose angle error grows with the position (at 2**20 with a PI factor of 16 it exceeds
bf16's rounding). This plugin replaces, at construction, the classes of the rope types pi_kernels computes exactly —
:data:`REPLACED_CLASSES`: ``default`` (``RotaryEmbedding``), ``linear`` (Position Interpolation,
``LinearScalingRotaryEmbedding`` with one factor), ``llama3`` and ``yarn`` (a fixed ``inv_freq``; YaRN's attention
factor multiplies the rotated features, as vLLM's cache does) — by subclasses whose every ``forward_*`` rotates
query and key in place with :func:`pi_kernels.inference.rotary_embedding_interp`, at frequencies computed in float64
(:func:`pi_kernels.scaling.rope_frequencies`). Constructor, attributes (the ``cos_sin_cache`` buffer included, for
code that reads it) and ``forward(positions, query, key=None) -> (query, key)`` are vLLM's. Every other rope type,
and a linear layer holding several factors (multi-LoRA), is left to vLLM.

Off unless ``PI_KERNELS_VLLM=1``: installing pi_kernels registers the entry point (``vllm.general_plugins``), and
:func:`register` does nothing without the variable, so a vLLM user's model never changes silently. The engine's
attention, KV cache and sampling stay vLLM's. Importable without vLLM; :func:`register` imports it.

Enable: ``PI_KERNELS_VLLM=1 vllm serve <model>`` (or set the variable before ``vllm.LLM(...)``).
"""

import os

from .. import inference
from ..scaling import rope_frequencies

__all__ = ["ENABLE_VARIABLE", "REPLACED_CLASSES", "register", "replacement_for"]

ENABLE_VARIABLE = "PI_KERNELS_VLLM"
# vLLM's class name -> the rope dict (``scaling.rope_frequencies``) of an instance, or None to leave it to vLLM.
REPLACED_CLASSES = {
    "RotaryEmbedding": lambda layer: {"rope_type": "default", "rope_theta": layer.base},
    "LinearScalingRotaryEmbedding": lambda layer: (
        {"rope_type": "linear", "rope_theta": layer.base, "factor": layer.scaling_factors[0]}
        if len(layer.scaling_factors) == 1 else None),
    "Llama3RotaryEmbedding": lambda layer: {
        "rope_type": "llama3", "rope_theta": layer.base, "factor": layer.scaling_factor,
        "low_freq_factor": layer.low_freq_factor, "high_freq_factor": layer.high_freq_factor,
        "original_max_position_embeddings": layer.orig_max_position},
    "YaRNScalingRotaryEmbedding": lambda layer: {
        "rope_type": "yarn", "rope_theta": layer.base, "factor": layer.scaling_factor,
        "original_max_position_embeddings": layer.max_position_embeddings, "beta_fast": layer.beta_fast,
        "beta_slow": layer.beta_slow, "truncate": layer.truncate, "attention_factor": layer.mscale},
}


class _PiKernelsRotary:
    """Mixin placed before a vLLM rotary class: every forward_* rotates in place with pi_kernels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rope = self.pi_kernels_rope(self)
        self.pi_kernels_active = rope is not None
        if self.pi_kernels_active:
            freqs = rope_frequencies(rope, self.rotary_dim)
            # float64 like the frequencies themselves; a buffer, so it follows the layer's .to(device).
            self.register_buffer("pi_kernels_inv_freq", freqs.inv_freq, persistent=False)
            self.pi_kernels_attention_factor = freqs.attention_factor

    def _pi_kernels_forward(self, vllm_forward, positions, query, key=None):
        if not self.pi_kernels_active:
            return vllm_forward(positions, query, key)
        positions = positions.flatten()
        tokens = positions.shape[0]
        # vLLM passes (tokens, heads · head_size), (tokens, heads, head_size) or (batch, seq, ...) with matching
        # positions; as its own forward_static does, every form is viewed as (tokens, heads · head_size).
        query_2d = query.view(tokens, -1)
        key_2d = None if key is None else key.view(tokens, -1)
        inference.rotary_embedding_interp(positions, query_2d, key_2d, self.head_size, rotary_dim=self.rotary_dim,
                                          inv_freq=self.pi_kernels_inv_freq, is_neox=self.is_neox_style)
        if self.pi_kernels_attention_factor != 1.0:
            for x in (query_2d, key_2d):
                if x is not None:
                    x.view(tokens, -1, self.head_size)[..., :self.rotary_dim].mul_(self.pi_kernels_attention_factor)
        return query, key

    def forward_native(self, positions, query, key=None):
        return self._pi_kernels_forward(super().forward_native, positions, query, key)

    def forward_cuda(self, positions, query, key=None):
        return self._pi_kernels_forward(super().forward_cuda, positions, query, key)

    def forward_hip(self, positions, query, key=None):
        return self._pi_kernels_forward(super().forward_hip, positions, query, key)

    def forward_xpu(self, positions, query, key=None):
        return self._pi_kernels_forward(super().forward_xpu, positions, query, key)

    def forward_cpu(self, positions, query, key=None):
        return self._pi_kernels_forward(super().forward_cpu, positions, query, key)

    def extra_repr(self):
        return super().extra_repr() + f", pi_kernels={self.pi_kernels_active}"


_REPLACEMENTS = {}


def replacement_for(vllm_class):
    """The pi_kernels subclass that replaces ``vllm_class`` (made once per class)."""
    name = vllm_class.__name__
    if name not in _REPLACEMENTS:
        _REPLACEMENTS[name] = type(f"PiKernels{name}", (_PiKernelsRotary, vllm_class),
                                   {"__module__": __name__, "pi_kernels_rope": staticmethod(REPLACED_CLASSES[name])})
    return _REPLACEMENTS[name]


def register():
    """Entry point of the ``vllm.general_plugins`` group: with ``PI_KERNELS_VLLM=1``, register the replacements of
    :data:`REPLACED_CLASSES` with vLLM's ``CustomOp.register_oot``; otherwise do nothing. Safe to call repeatedly
    (vLLM loads plugins in every process, maybe more than once)."""
    if os.environ.get(ENABLE_VARIABLE) != "1":
        return
    from vllm.model_executor import custom_op
    from vllm.model_executor.layers import rotary_embedding

    for name in REPLACED_CLASSES:
        if name not in custom_op.op_registry_oot:
            custom_op.CustomOp.register_oot(replacement_for(getattr(rotary_embedding, name)), name=name)
