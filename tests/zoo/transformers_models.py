"""``transformers`` models with task heads, built from tiny configs (no weights
are downloaded): 2 layers, hidden 32, sequence 8, images 32x32 or smaller.

A base model returns its residual stream, which cannot be permuted (it is an
output), so every model here has a head: ``...ForCausalLM``,
``...ForSequenceClassification``, ``...ForImageClassification``. Models whose
output holds more than the head's logits (encoder-decoders, CLIP) are wrapped
in :class:`Head`, which returns one output only.

:func:`cases` lists the :class:`~zoo.harness.Case` objects (empty when
``transformers`` is missing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .harness import DT, Case, Inputs, InputsFn, zero_dropout

VOCAB = 64
F32_TOL = 1e-5  # models that compute parts in float32 even after .double(); negative controls reach >= 1e-3
FLOAT32 = {  # model -> where it computes in float32 after .double()
    **dict.fromkeys(
        "llama llama-seqcls mistral qwen2 qwen3 gemma gemma2 phi3 olmo2 mixtral qwen2-moe olmoe".split(),
        "RMSNorm upcast (hidden_states.to(float32))",
    ),
    "deberta": "DebertaLayerNorm upcast",
    "t5": "T5LayerNorm upcast",
    "mamba": "MambaRMSNorm upcast",
    "gpt-neo": "GPT-Neo attention in float32",
}
SEQ = 8


class Head(nn.Module):
    """``inner(**dict(zip(names, args)), **fixed)[key]``: one output of a
    transformers model whose output holds more than its head."""

    def __init__(self, inner: nn.Module, names: tuple[str, ...], key: str = "logits") -> None:
        super().__init__()
        self.inner, self.names, self.key = inner, names, key

    def forward(self, *args: Tensor) -> Tensor:
        return getattr(self.inner(**dict(zip(self.names, args))), self.key)


def ids(seed: int, batch: int, length: int = SEQ, vocab: int = VOCAB) -> Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def images(seed: int, batch: int, channels: int = 3, size: int = 32) -> Tensor:
    return torch.randn(batch, channels, size, size, dtype=DT, generator=torch.Generator().manual_seed(seed))


def text_inputs(length: int = SEQ, vocab: int = VOCAB) -> InputsFn:
    """Token ids; row ``r`` ends with ``r % 3`` padding tokens (id 2) after an
    end-of-sequence token (id 1), so that EOS / last-non-pad pooling picks a
    different position per row."""

    def fn(seed: int, batch: int) -> Inputs:
        x = ids(seed, batch, length, vocab)
        for r in range(batch):
            end = length - 1 - r % 3
            x[r, end] = 1
            x[r, end + 1 :] = 2
        return (x,), {}

    return fn


def pair_inputs(length: int = SEQ, vocab: int = VOCAB, dec_length: int = 5) -> InputsFn:
    def fn(seed: int, batch: int) -> Inputs:
        return (ids(seed, batch, length, vocab), ids(seed + 1000, batch, dec_length, vocab)), {}

    return fn


def image_inputs(channels: int = 3, size: int = 32) -> InputsFn:
    def fn(seed: int, batch: int) -> Inputs:
        return (images(seed, batch, channels, size),), {}

    return fn


def audio_inputs(length: int = 400) -> InputsFn:
    def fn(seed: int, batch: int) -> Inputs:
        return (torch.randn(batch, length, dtype=DT, generator=torch.Generator().manual_seed(seed)),), {}

    return fn


_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=32,
    use_cache=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)
_GQA = dict(_TEXT, num_key_value_heads=2)


def _make(
    cls: str, config_cls: str, inputs: InputsFn, wrap: tuple[str, ...] | None = None, key: str = "logits", **config: Any
):
    def build() -> tuple[nn.Module, InputsFn]:
        import transformers

        cfg = zero_dropout(getattr(transformers, config_cls)(**config))
        if "num_labels" not in config and hasattr(cfg, "num_labels"):
            cfg.num_labels = 5
        model = getattr(transformers, cls)(cfg)
        if wrap is not None:
            model = Head(model, wrap, key)
        return model, inputs

    return build


def _case(name: str, family: str, cls: str, config_cls: str, inputs: InputsFn, **kw: Any) -> Case:
    case_kw = {
        k: kw.pop(k) for k in ("tol", "noise", "xfail", "coverage", "train", "note", "batch", "rejects") if k in kw
    }
    wrap, key = kw.pop("wrap", None), kw.pop("key", "logits")
    return Case(name, family, _make(cls, config_cls, inputs, wrap, key, **kw), **case_kw)


def cases() -> list[Case]:
    try:
        import transformers
    except ImportError:
        return []
    transformers.logging.set_verbosity_error()
    T, I = text_inputs(), image_inputs()  # noqa: E741
    c: list[Case] = []
    # ------------------------------------------------------------ decoder LLMs
    c += [
        _case("llama", "decoder", "LlamaForCausalLM", "LlamaConfig", T, **_GQA),
        _case("llama-seqcls", "decoder", "LlamaForSequenceClassification", "LlamaConfig", T, **_GQA),
        _case("mistral", "decoder", "MistralForCausalLM", "MistralConfig", T, **_GQA, sliding_window=4),
        _case("qwen2", "decoder", "Qwen2ForCausalLM", "Qwen2Config", T, **_GQA),
        _case("qwen3", "decoder", "Qwen3ForCausalLM", "Qwen3Config", T, **_GQA, head_dim=8),
        _case("gemma", "decoder", "GemmaForCausalLM", "GemmaConfig", T, **_GQA, head_dim=8),
        _case("gemma2", "decoder", "Gemma2ForCausalLM", "Gemma2Config", T, **_GQA, head_dim=8),
        _case("phi", "decoder", "PhiForCausalLM", "PhiConfig", T, **_TEXT, partial_rotary_factor=0.5),
        _case("phi3", "decoder", "Phi3ForCausalLM", "Phi3Config", T, **_GQA),
        _case(
            "falcon",
            "decoder",
            "FalconForCausalLM",
            "FalconConfig",
            T,
            **{k: v for k, v in _TEXT.items() if k not in ("intermediate_size", "max_position_embeddings")},
            new_decoder_architecture=True,
            num_kv_heads=2,
        ),
        _case("gpt-neox", "decoder", "GPTNeoXForCausalLM", "GPTNeoXConfig", T, **_TEXT, rotary_pct=0.5),
        _case(
            "gpt-j",
            "decoder",
            "GPTJForCausalLM",
            "GPTJConfig",
            T,
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            use_cache=False,
        ),
        _case(
            "opt",
            "decoder",
            "OPTForCausalLM",
            "OPTConfig",
            T,
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=48,
            num_attention_heads=4,
            max_position_embeddings=32,
            word_embed_proj_dim=32,
            use_cache=False,
        ),
        _case(
            "bloom",
            "decoder",
            "BloomForCausalLM",
            "BloomConfig",
            T,
            vocab_size=VOCAB,
            hidden_size=32,
            n_layer=2,
            n_head=4,
            use_cache=False,
        ),
        _case(
            "gpt2",
            "decoder",
            "GPT2LMHeadModel",
            "GPT2Config",
            T,
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            use_cache=False,
        ),
        _case(
            "gpt2-seqcls",
            "decoder",
            "GPT2ForSequenceClassification",
            "GPT2Config",
            T,
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            use_cache=False,
            pad_token_id=2,
        ),
        _case(
            "gpt-neo",
            "decoder",
            "GPTNeoForCausalLM",
            "GPTNeoConfig",
            T,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            use_cache=False,
        ),
        _case("stablelm", "decoder", "StableLmForCausalLM", "StableLmConfig", T, **_GQA),
        _case("starcoder2", "decoder", "Starcoder2ForCausalLM", "Starcoder2Config", T, **_GQA),
        _case("olmo2", "decoder", "Olmo2ForCausalLM", "Olmo2Config", T, **_GQA),
        _case(
            "gpt-bigcode",
            "decoder",
            "GPTBigCodeForCausalLM",
            "GPTBigCodeConfig",
            T,
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            use_cache=False,
            multi_query=True,
        ),
        _case(
            "codegen",
            "decoder",
            "CodeGenForCausalLM",
            "CodeGenConfig",
            T,
            vocab_size=VOCAB,
            n_positions=32,
            n_ctx=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            use_cache=False,
        ),
    ]
    # ----------------------------------------------------------------- encoders
    enc = dict(_TEXT, type_vocab_size=2)
    enc.pop("use_cache")
    c += [
        _case("bert", "encoder", "BertForSequenceClassification", "BertConfig", T, **enc),
        _case("bert-mlm", "encoder", "BertForMaskedLM", "BertConfig", T, **enc),
        _case("bert-tokcls", "encoder", "BertForTokenClassification", "BertConfig", T, **enc),
        _case(
            "roberta",
            "encoder",
            "RobertaForSequenceClassification",
            "RobertaConfig",
            T,
            **dict(enc, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        ),
        _case(
            "xlm-roberta",
            "encoder",
            "XLMRobertaForSequenceClassification",
            "XLMRobertaConfig",
            T,
            **dict(enc, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        ),
        _case(
            "distilbert",
            "encoder",
            "DistilBertForSequenceClassification",
            "DistilBertConfig",
            T,
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=48,
            max_position_embeddings=32,
        ),
        _case(
            "albert", "encoder", "AlbertForSequenceClassification", "AlbertConfig", T, **dict(enc, embedding_size=16)
        ),
        _case(
            "electra", "encoder", "ElectraForSequenceClassification", "ElectraConfig", T, **dict(enc, embedding_size=16)
        ),
        _case(
            "deberta-v2",
            "encoder",
            "DebertaV2ForSequenceClassification",
            "DebertaV2Config",
            T,
            **dict(
                enc, relative_attention=True, position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"]
            ),
        ),
        _case(
            "deberta",
            "encoder",
            "DebertaForSequenceClassification",
            "DebertaConfig",
            T,
            **dict(enc, relative_attention=True, max_relative_positions=16, pos_att_type=["p2c", "c2p"]),
        ),
        _case(
            "mpnet",
            "encoder",
            "MPNetForSequenceClassification",
            "MPNetConfig",
            T,
            **{k: v for k, v in enc.items() if k != "type_vocab_size"},
        ),
        _case(
            "convbert",
            "encoder",
            "ConvBertForSequenceClassification",
            "ConvBertConfig",
            T,
            **dict(enc, embedding_size=32, head_ratio=2, conv_kernel_size=3),
        ),
    ]
    # ----------------------------------------------------------- encoder-decoder
    P = pair_inputs()
    bartlike = dict(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=32,
        use_cache=False,
        pad_token_id=2,
        bos_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    names = ("input_ids", "decoder_input_ids")
    c += [
        _case(
            "t5",
            "encoder-decoder",
            "T5ForConditionalGeneration",
            "T5Config",
            P,
            wrap=names,
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            use_cache=False,
            decoder_start_token_id=0,
        ),
        _case("bart", "encoder-decoder", "BartForConditionalGeneration", "BartConfig", P, wrap=names, **bartlike),
        _case("marian", "encoder-decoder", "MarianMTModel", "MarianConfig", P, wrap=names, **bartlike),
        _case(
            "pegasus", "encoder-decoder", "PegasusForConditionalGeneration", "PegasusConfig", P, wrap=names, **bartlike
        ),
        _case("mbart", "encoder-decoder", "MBartForConditionalGeneration", "MBartConfig", P, wrap=names, **bartlike),
    ]
    # ----------------------------------------------------------------- MoE, SSM
    c += [
        _case(
            "mixtral",
            "moe",
            "MixtralForCausalLM",
            "MixtralConfig",
            T,
            **_GQA,
            num_local_experts=4,
            num_experts_per_tok=2,
            experts_implementation="batched_mm",
        ),
        _case(
            "qwen2-moe",
            "moe",
            "Qwen2MoeForCausalLM",
            "Qwen2MoeConfig",
            T,
            **_GQA,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            experts_implementation="batched_mm",
        ),
        _case(
            "mixtral-experts-loop",
            "moe",
            "MixtralForCausalLM",
            "MixtralConfig",
            T,
            **_GQA,
            num_local_experts=4,
            num_experts_per_tok=2,
            experts_implementation="eager",
            rejects="data-dependent",
            note="the eager experts loop skips empty experts (`if ... numel() == 0`): torch.export cannot trace it",
        ),
        _case(
            "mixtral-grouped-mm",
            "moe",
            "MixtralForCausalLM",
            "MixtralConfig",
            T,
            **_GQA,
            num_local_experts=4,
            num_experts_per_tok=2,
            experts_implementation="grouped_mm",
            rejects="raises RuntimeError when run eagerly on example_inputs",
            note="torch._grouped_mm has no float64 kernel: the model cannot run on these inputs, a typed error is due",
        ),
        _case(
            "olmoe",
            "moe",
            "OlmoeForCausalLM",
            "OlmoeConfig",
            T,
            **_GQA,
            num_experts=4,
            num_experts_per_tok=2,
            experts_implementation="batched_mm",
        ),
        _case(
            "mamba",
            "ssm",
            "MambaForCausalLM",
            "MambaConfig",
            T,
            vocab_size=VOCAB,
            hidden_size=32,
            state_size=4,
            num_hidden_layers=2,
            expand=2,
            conv_kernel=3,
            use_cache=False,
            time_step_rank=4,
        ),
        _case(
            "rwkv",
            "ssm",
            "RwkvForCausalLM",
            "RwkvConfig",
            T,
            vocab_size=VOCAB,
            context_length=32,
            hidden_size=32,
            num_hidden_layers=2,
            attention_hidden_size=32,
            intermediate_size=48,
            use_cache=False,
        ),
    ]
    # ------------------------------------------------------------------- vision
    vit = dict(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
    )
    I16, I64 = image_inputs(size=16), image_inputs(size=64)
    c += [
        _case("vit", "vision", "ViTForImageClassification", "ViTConfig", I16, **vit),
        _case("deit", "vision", "DeiTForImageClassification", "DeiTConfig", I16, **vit),
        _case(
            "beit", "vision", "BeitForImageClassification", "BeitConfig", I16, **vit, use_relative_position_bias=True
        ),
        _case("dinov2", "vision", "Dinov2ForImageClassification", "Dinov2Config", I16, **dict(vit, mlp_ratio=2)),
        _case(
            "swin",
            "vision",
            "SwinForImageClassification",
            "SwinConfig",
            I,
            image_size=32,
            patch_size=2,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 4],
            window_size=4,
        ),
        _case(
            "swinv2",
            "vision",
            "Swinv2ForImageClassification",
            "Swinv2Config",
            I,
            image_size=32,
            patch_size=2,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 4],
            window_size=4,
        ),
        _case(
            "convnext",
            "vision",
            "ConvNextForImageClassification",
            "ConvNextConfig",
            I,
            hidden_sizes=[8, 16],
            depths=[1, 2],
            num_stages=2,
            layer_scale_init_value=0.5,
        ),
        _case(
            "convnextv2",
            "vision",
            "ConvNextV2ForImageClassification",
            "ConvNextV2Config",
            I,
            hidden_sizes=[8, 16],
            depths=[1, 2],
            num_stages=2,
        ),
        _case(
            "resnet",
            "vision",
            "ResNetForImageClassification",
            "ResNetConfig",
            I,
            embedding_size=10,
            hidden_sizes=[16, 24],
            depths=[1, 2],
            layer_type="bottleneck",
        ),
        _case(
            "resnet-basic",
            "vision",
            "ResNetForImageClassification",
            "ResNetConfig",
            I,
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            layer_type="basic",
        ),
        _case(
            "mobilenet-v2",
            "vision",
            "MobileNetV2ForImageClassification",
            "MobileNetV2Config",
            I,
            batch=4,
            image_size=32,
            depth_multiplier=0.25,
        ),
        _case(
            "mobilenet-v1",
            "vision",
            "MobileNetV1ForImageClassification",
            "MobileNetV1Config",
            I,
            image_size=32,
            depth_multiplier=0.25,
        ),
        _case(
            "segformer",
            "vision",
            "SegformerForImageClassification",
            "SegformerConfig",
            I,
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            patch_sizes=[7, 3],
            strides=[4, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=32,
        ),
        _case(
            "segformer-seg",
            "vision",
            "SegformerForSemanticSegmentation",
            "SegformerConfig",
            I,
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            patch_sizes=[7, 3],
            strides=[4, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=32,
        ),
        _case(
            "efficientnet",
            "vision",
            "EfficientNetForImageClassification",
            "EfficientNetConfig",
            I,
            noise=0.3,
            image_size=32,
            width_coefficient=0.25,
            depth_coefficient=0.2,
            hidden_dim=320,
        ),
        _case(
            "regnet",
            "vision",
            "RegNetForImageClassification",
            "RegNetConfig",
            I,
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            groups_width=4,
        ),
        _case(
            "poolformer",
            "vision",
            "PoolFormerForImageClassification",
            "PoolFormerConfig",
            I,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_encoder_blocks=2,
            patch_sizes=[7, 3],
            strides=[4, 2],
            padding=[2, 1],
            pool_size=3,
            layer_scale_init_value=0.5,
        ),
        _case(
            "levit",
            "vision",
            "LevitForImageClassification",
            "LevitConfig",
            I64,
            image_size=64,
            hidden_sizes=[16, 32],
            num_attention_heads=[2, 2],
            depths=[1, 1],
            key_dim=[8, 8],
            mlp_ratio=[2, 2],
            attention_ratio=[2, 2],
            down_ops=[["Subsample", 8, 2, 2, 2, 2]],
        ),
        _case(
            "mobilevit",
            "vision",
            "MobileViTForImageClassification",
            "MobileViTConfig",
            I64,
            image_size=64,
            neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48],
            hidden_sizes=[16, 24, 32],
            num_attention_heads=2,
            patch_size=2,
            expand_ratio=2.0,
        ),
        _case(
            "cvt",
            "vision",
            "CvtForImageClassification",
            "CvtConfig",
            I,
            embed_dim=[16, 32],
            num_heads=[1, 2],
            depth=[1, 2],
            patch_sizes=[7, 3],
            patch_stride=[4, 2],
            patch_padding=[2, 1],
            mlp_ratio=[2.0, 2.0],
            cls_token=[False, True],
            qkv_bias=[True, True],
            attention_drop_rate=[0.0, 0.0],
            drop_rate=[0.0, 0.0],
            drop_path_rate=[0.0, 0.0],
            kernel_qkv=[3, 3],
            padding_kv=[1, 1],
            stride_kv=[2, 2],
            padding_q=[1, 1],
            stride_q=[1, 1],
            qkv_projection_method=["dw_bn", "dw_bn"],
        ),
    ]

    # ---------------------------------------------------------- multimodal, audio
    def clip(seed: int, batch: int) -> Inputs:
        return (ids(seed, batch), images(seed, batch, 3, 16)), {}

    clip_cfg = dict(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=32,
            eos_token_id=1,
            bos_token_id=0,
            pad_token_id=2,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
        ),
        projection_dim=24,
    )
    c += [
        _case(
            "clip",
            "multimodal",
            "CLIPModel",
            "CLIPConfig",
            clip,
            wrap=("input_ids", "pixel_values"),
            key="logits_per_image",
            **clip_cfg,
        ),
        _case(
            "clip-text",
            "multimodal",
            "CLIPTextModelWithProjection",
            "CLIPTextConfig",
            T,
            wrap=("input_ids",),
            key="text_embeds",
            **clip_cfg["text_config"],
            projection_dim=24,
        ),
        _case(
            "clip-vision",
            "multimodal",
            "CLIPVisionModelWithProjection",
            "CLIPVisionConfig",
            I16,
            wrap=("pixel_values",),
            key="image_embeds",
            **clip_cfg["vision_config"],
            projection_dim=24,
        ),
        _case(
            "siglip",
            "multimodal",
            "SiglipModel",
            "SiglipConfig",
            clip,
            wrap=("input_ids", "pixel_values"),
            key="logits_per_image",
            text_config=dict(clip_cfg["text_config"], max_position_embeddings=8),
            vision_config=clip_cfg["vision_config"],
        ),
    ]
    w2v = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        classifier_proj_size=16,
        mask_time_prob=0.0,
    )
    A = audio_inputs()

    def whisper(seed: int, batch: int) -> Inputs:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, 8, 16, dtype=DT, generator=g), ids(seed, batch, 4)), {}

    whisper_cfg = dict(
        vocab_size=VOCAB,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_source_positions=8,
        max_target_positions=16,
        use_cache=False,
        pad_token_id=2,
        bos_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    c += [
        _case("wav2vec2", "audio", "Wav2Vec2ForSequenceClassification", "Wav2Vec2Config", A, **w2v),
        _case("wav2vec2-ctc", "audio", "Wav2Vec2ForCTC", "Wav2Vec2Config", A, **dict(w2v, vocab_size=VOCAB)),
        _case(
            "wavlm",
            "audio",
            "WavLMForSequenceClassification",
            "WavLMConfig",
            A,
            **dict(w2v, num_buckets=16, max_bucket_distance=32),
        ),
        _case("hubert", "audio", "HubertForSequenceClassification", "HubertConfig", A, **w2v),
        _case(
            "data2vec-audio",
            "audio",
            "Data2VecAudioForSequenceClassification",
            "Data2VecAudioConfig",
            A,
            **dict(w2v, num_conv_pos_embeddings=3, num_conv_pos_embedding_groups=4),
        ),
        _case(
            "whisper",
            "audio",
            "WhisperForConditionalGeneration",
            "WhisperConfig",
            whisper,
            wrap=("input_features", "decoder_input_ids"),
            **whisper_cfg,
        ),
        _case(
            "whisper-cls",
            "audio",
            "WhisperForAudioClassification",
            "WhisperConfig",
            lambda s, b: (whisper(s, b)[0][:1], {}),
            wrap=("input_features",),
            **dict(whisper_cfg, classifier_proj_size=16),
        ),
    ]
    return [
        replace(x, tol=F32_TOL, note=f"{FLOAT32[x.name]}: float32 rounding inside a float64 model")
        if x.name in FLOAT32
        else x
        for x in c
    ]


CASES: Callable[[], list[Case]] = cases
