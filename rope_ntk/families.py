"""Family quirks as data: one row per Hugging Face ``model_type``.

The patcher reads only this table to learn how a family's rotary module
hands angles to its attention (``layout``), where its base and rotated
width live when the config has no ``rope_parameters`` (GPT-J), whether the
module serves several layer types with their own RoPE (Gemma 3), and
whether attention itself reads the RoPE config (DeepSeek's softmax scale).

A ``model_type`` missing here is patched as a rotate-half family, after a
check that its module really returns rotate-half (cos, sin); a family that
cannot be patched correctly has ``unsupported`` set to the reason.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one family's rotary embedding is built and consumed."""

    model_type: str
    name: str
    # how (cos, sin) reach attention: see rotary.LAYOUTS
    layout: str = "half"
    # why cached keys cannot be re-rotated (cache_consistent unsupported: dynamic methods run the legacy way)
    no_cache_rotation: str | None = None
    # the module is called as (x, position_ids, layer_type) and keeps one RoPE per layer type
    per_layer_type: bool = False
    # layer types a patch scales by default (the others keep their own, unscaled RoPE); None: all
    scaled_layer_types: tuple[str, ...] | None = None
    # base and rotated-width attribute when the config has no rope_parameters
    rope_theta: float | None = None
    rotary_dim_key: str | None = None
    # transformers reads rope_parameters for this family (False: scaling lives only in rope_ntk's record)
    native: bool = True
    # the rope_type values transformers accepts for this family; None: all of them
    native_rope_types: tuple[str, ...] | None = None
    # attention modules multiply their softmax scale by yarn_mscale(factor, mscale_all_dim)**2;
    # the value names the config attribute of the query-key width the unscaled scale comes from
    softmax_mscale_dim_key: str | None = None
    # transformers 4.x only. Per-layer-type families there keep one rotary module per layer type
    # (module attribute name -> layer type) and the unscaled layer types' base in their own attribute
    # (layer type -> config attribute); e.g. Gemma 3's rotary_emb_local and rope_local_base_freq.
    modules_4x: tuple[tuple[str, str], ...] = ()
    base_keys_4x: tuple[tuple[str, str], ...] = ()
    # 4.x config attributes that mirror a RoPE key and must be written along with it, e.g. GPT-NeoX's
    # rotary_emb_base for rope_theta (its 4.x config re-derives rope_theta from it on load)
    aliases_4x: tuple[tuple[str, str], ...] = ()
    # 4.x configs that validate rope_scaling the old way: the rope types they accept (None: as
    # native_rope_types) and the exact keys rope_scaling may hold besides "type" (None: any)
    native_rope_types_4x: tuple[str, ...] | None = None
    scaling_keys_4x: tuple[str, ...] | None = None
    unsupported: str | None = None
    note: str = ""

    def accepted_rope_types(self, transformers_4: bool) -> tuple[str, ...] | None:
        """The rope types transformers (4.x or 5.x) accepts in this family's config; None: all."""
        if transformers_4 and self.native_rope_types_4x is not None:
            return self.native_rope_types_4x
        return self.native_rope_types


# OLMo's 4.x configs accept only {"type": linear | dynamic, "factor": float > 1}
OLD_STYLE_4X = ("default", "linear", "dynamic")
OLD_STYLE_NOTE = "transformers 4.x accepts only linear and dynamic here; other methods are reapplied by rope_ntk there"

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("llama", "Llama"),
        Family("mistral", "Mistral"),
        Family("mixtral", "Mixtral"),
        Family("qwen2", "Qwen2"),
        Family("qwen2_moe", "Qwen2-MoE"),
        Family("qwen3", "Qwen3"),
        Family("qwen3_moe", "Qwen3-MoE"),
        Family("phi", "Phi", note="partial rotary"),
        Family(
            "phi3",
            "Phi-3",
            native_rope_types=("default", "longrope"),
            scaling_keys_4x=("short_factor", "long_factor"),
            note="transformers accepts only default and longrope here; other methods are reapplied by rope_ntk; "
            "transformers 4.x takes longrope's factor as max_position_embeddings / original_max_position_embeddings",
        ),
        Family(
            "gpt_neox",
            "GPT-NeoX",
            aliases_4x=(("rope_theta", "rotary_emb_base"), ("partial_rotary_factor", "rotary_pct")),
            note="partial rotary",
        ),
        Family(
            "gptj",
            "GPT-J",
            layout="sin-cos",
            rope_theta=10_000.0,
            rotary_dim_key="rotary_dim",
            native=False,
            note="interleaved pairs, (sin, cos) table; no native scaling: reapplied by rope_ntk on load",
        ),
        Family("stablelm", "StableLM", note="partial rotary"),
        Family("gemma", "Gemma"),
        Family("gemma2", "Gemma 2"),
        Family(
            "gemma3_text",
            "Gemma 3",
            per_layer_type=True,
            scaled_layer_types=("full_attention",),
            modules_4x=(("rotary_emb", "full_attention"), ("rotary_emb_local", "sliding_attention")),
            base_keys_4x=(("sliding_attention", "rope_local_base_freq"),),
            note="local layers keep their own base, unscaled; global layers scaled",
        ),
        Family("olmo", "OLMo", native_rope_types_4x=OLD_STYLE_4X, scaling_keys_4x=("factor",), note=OLD_STYLE_NOTE),
        Family("olmo2", "OLMo 2", native_rope_types_4x=OLD_STYLE_4X, scaling_keys_4x=("factor",), note=OLD_STYLE_NOTE),
        Family("cohere", "Cohere", layout="interleaved", note="interleaved pairs"),
        Family("falcon", "Falcon"),
        Family("granite", "Granite"),
        Family(
            "deepseek_v3",
            "DeepSeek-V3",
            softmax_mscale_dim_key="qk_head_dim",
            # TODO: re-rotate DeepSeek's cache: it holds the latent kv_nope in .keys and the rotated k_rot in
            # .values (interleaved pairs when config.rope_interleave), unlike every other family
            no_cache_rotation="its MLA cache keeps the rotated key part in the values slot (not handled yet)",
            note="rotary part of MLA heads; YaRN mscale_all_dim also scales the softmax",
        ),
        Family("starcoder2", "StarCoder2"),
        Family("persimmon", "Persimmon", note="partial rotary"),
        Family("helium", "Helium"),
        Family(
            "nemotron",
            "Nemotron",
            native_rope_types_4x=("default",),
            note="partial rotary; transformers 4.x builds only the default RoPE here (reapplied by rope_ntk there)",
        ),
    ]
}


def family_of(model) -> Family:
    """The row for ``model``'s ``config.model_type``, or a rotate-half default."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    return FAMILIES.get(model_type) or Family(model_type, type(model).__name__)
