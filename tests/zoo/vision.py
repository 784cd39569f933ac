"""Second tier: torchvision and timm models with random weights (no
downloads), small inputs (64x64 unless a model needs more), batch 2.

``torchvision_cases()``: every classification model of
``torchvision.models.list_models(module=torchvision.models)``.
``timm_cases()``: ``TIMM_MODELS``, the smallest variant of each family.
Both return ``[]`` when the library is missing.
"""

from __future__ import annotations

import torch
from torch import nn

from .harness import DT, Case, Inputs, InputsFn

NUM_CLASSES = 5

# models that need a given input size (side); others get 64
TV_SIZE = {"inception_v3": 75, "googlenet": 64, "vit_h_14": 56}
TV_KWARGS = {  # ViTs and MaxViT take their input size as an argument
    "vit_b_16": {"image_size": 64},
    "vit_b_32": {"image_size": 64},
    "vit_l_16": {"image_size": 64},
    "vit_l_32": {"image_size": 64},
    "vit_h_14": {"image_size": 56},
    # inception_v3 at 75x75: the aux head's 5x5/3 pool needs >= 5x5 at Mixed_6e (~110 px), so no aux head
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": True, "init_weights": True},
}
# float64 copies of these would need several GiB each (the check holds ~5
# copies): float32, looser tolerance (float32 rounding, controls >= 1e-3)
TV_FLOAT32 = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf"}
# float64 models whose measured noise floor (1e-15 relative parameter noise)
# lies above KEEP_TOL / 100: EfficientNets (SiLU + squeeze-excitation gates,
# deep, BatchNorm in train mode over batch 2 x 2x2 final maps) amplify
# rounding ~1e4-1e5x. tol 1e-8 keeps the check's 100x floor margin
# (measured floors 4.9e-11 .. 1.7e-10 at noise 0.02); the permuted error
# sits at the floor (rounding), the negative controls still move >= 1e-3.
TOL = {  # case name -> (tol, measured floor, as a note)
    "tv-efficientnet_b1": (1e-7, "floor 1.7e-10 (rounding amplified by 8 SE stages, train-mode BN on 2x2 maps)"),
    "timm-efficientnet_b0": (1e-8, "floor 4.9e-11 (rounding amplified by SE gates, train-mode BN on 2x2 maps)"),
    "timm-convmixer_768_32": (1e-8, "floor 3.2e-11 (32 GELU+BN blocks, train-mode BN on the 64x64 grid over batch 2)"),
    "timm-selecsls42b": (1e-8, "floor 2.9e-11 (train-mode BN on 2x2 maps)"),
    # eval error 1.5e-14; train-mode BatchNorm at 75x75 normalizes 1x1 final maps over batch 2 (2 values)
    "tv-inception_v3": (1e-6, "train-mode floor 2.3e-9 (BatchNorm over 2 values per channel at 75x75)"),
    "timm-inception_v3": (1e-5, "train-mode floor 1.9e-8 (BatchNorm over 2 values per channel at 75x75), eval 5e-15"),
}
# Deep EfficientNets in eval mode amplify the random shift of BatchNorm running statistics that
# prepare() applies per layer: at full jitter the eval floor (1e-15 relative parameter noise) reached
# 3.8e-3 (b5), 0.15 (b6), 7.5e-5 (b7), 4.3e-7 (v2_s), 0.49 (v2_m), 1.07 (v2_l); train mode stays at ~1e-13. A smaller
# shift keeps every channel's statistics distinct (a wrong permutation of them still shows) with a
# floor far below the tolerance (measured at 0.2: b2-b7 1.6e-13 .. 4.1e-13, v2_s 8.7e-14; at 0: v2_m 3.2e-13,
# v2_l 3.0e-13).
BN_JITTER = {f"tv-efficientnet_b{i}": 0.2 for i in range(2, 8)} | {
    "tv-efficientnet_v2_s": 0.2,
    "tv-efficientnet_v2_m": 0.0,
    "tv-efficientnet_v2_l": 0.0,
}
# edgenext: its XCA temperature (one scalar per head, ones + N(0, 0.02^2)) permuted alone moves the
# output < 1e-3, so with 3 controls that one weak group is a third (> CONTROL_WEAK_SHARE): 8 controls
# gcvit's squeeze-excite fc1 and cait's deep layer-scaled blocks (24, gamma ~ 1e-5 init scaled by
# noise) each have groups that, permuted alone, move the output < 1e-3 on these inputs (measured:
# 1 of 3 and 2 of 3, with the largest change 1.8 and 1.0): more controls, so that >= 75% must move it.
# torchvision's MaxViT at 2x2 windows: one of 3 controls (a deep block's qkv) weak, measured 8.5e-4 < 1e-3.
CONTROLS = {"timm-edgenext_xx_small": 8, "timm-gcvit_xxtiny": 8, "timm-cait_xxs24_224": 8, "tv-maxvit_t": 8}
# CaiT's layer scale starts at 1e-5, so its 24 residual branches barely touch the output and no
# negative control can move it (7 of 8 weak): build it with layer scale 1, which weights its blocks
# like any other ViT's.
TIMM_KWARGS: dict[str, dict[str, float]] = {"cait_xxs24_224": {"init_values": 1.0}}


def _images(size: int) -> InputsFn:
    def fn(seed: int, batch: int) -> Inputs:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, 3, size, size, dtype=DT, generator=g),), {}

    return fn


LITE_PARAMS = 15_000_000  # torchvision models above this many parameters get the lite check (Case.lite)


def _num_params(name: str) -> int:
    import torchvision

    weights = list(torchvision.models.get_model_weights(name))
    return int(weights[0].meta.get("num_params", 0)) if weights else 0


def torchvision_cases() -> list[Case]:
    try:
        import torchvision
    except ImportError:
        return []
    cases = []
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        size = TV_SIZE.get(name, 64)

        def build(name: str = name, size: int = size) -> tuple[nn.Module, InputsFn]:
            if name == "maxvit_t":  # maxvit_t fixes partition 7 (input >= 224): its layout with 2x2 windows at 64x64
                from torchvision.models.maxvit import MaxVit

                model = MaxVit(
                    input_size=(size, size),
                    stem_channels=64,
                    block_channels=[64, 128, 256, 512],
                    block_layers=[2, 2, 5, 2],
                    head_dim=32,
                    stochastic_depth_prob=0.0,
                    partition_size=2,
                    num_classes=NUM_CLASSES,
                )
                return model, _images(size)
            kwargs = dict(TV_KWARGS.get(name, {}))
            model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)
            return model, _images(size)

        f32 = name in TV_FLOAT32
        lite = _num_params(name) > LITE_PARAMS  # and 2 negative controls, not 3: each copies the model
        default = (5e-4, "float32 (too big for float64): floor ~3e-6 at 4.5 float32 epsilons") if f32 else (1e-9, "")
        tol, note = TOL.get(f"tv-{name}", default)
        cases.append(
            Case(
                f"tv-{name}",
                "torchvision",
                build,
                noise=0.02,
                dtype=torch.float32 if f32 else DT,
                tol=tol,
                controls=CONTROLS.get(f"tv-{name}", 2 if lite else 3),
                note=note,
                lite=lite,
                bn_jitter=BN_JITTER.get(f"tv-{name}", 1.0),
            )
        )
    return cases


TIMM_MODELS = """
resnet18 resnet26d resnext26ts seresnext26d_32x4d resnetv2_50 regnetx_002 regnety_002 regnetz_b16
efficientnet_b0 efficientnet_lite0 tinynet_e mobilenetv3_small_050 mobilenetv3_large_100 mobilenetv2_050
mnasnet_small fbnetc_100 spnasnet_100 lcnet_050 hardcorenas_a ghostnet_100 ghostnetv2_100 repghostnet_050
rexnet_100 convnext_atto convnextv2_atto inception_next_tiny vit_tiny_patch16_224 vit_small_patch16_224
vit_relpos_small_patch16_224 deit_tiny_patch16_224 deit_tiny_distilled_patch16_224 deit3_small_patch16_224
eva02_tiny_patch14_224 flexivit_small swin_tiny_patch4_window7_224 swinv2_cr_tiny_ns_224 beit_base_patch16_224
mixer_s16_224 resmlp_12_224 gmlp_ti16_224 poolformer_s12 poolformerv2_s12 convformer_s18 caformer_s18 levit_128s
dla34 densenet121 dpn68 hrnet_w18_small inception_v3 inception_v4 xception41 legacy_xception nfnet_l0
dm_nfnet_f0 nf_resnet26 cspresnet50 cspdarknet53 darknet53 repvgg_a0 halonet26t botnet26t_256 lambda_resnet26t
volo_d1_224 coat_tiny coat_lite_tiny crossvit_tiny_240 edgenext_xx_small efficientformer_l1 efficientformerv2_s0
maxvit_tiny_tf_224 coatnet_0_rw_224 mobilevit_xxs mobilevitv2_050 selecsls42b res2net50_14w_8s resnest14d
skresnet18 gernet_s tresnet_m visformer_tiny pit_ti_224 tnt_s_patch16_224 twins_svt_small pvt_v2_b0
cait_xxs24_224 xcit_nano_12_p16_224 gcvit_xxtiny fastvit_t8 mobileone_s0 efficientvit_b0 efficientvit_m0
hgnet_tiny hgnetv2_b0 tiny_vit_5m_224 davit_tiny focalnet_tiny_srf nest_tiny sequencer2d_s vgg11 ese_vovnet19b_dw
mambaout_femto starnet_s1 rdnet_tiny convmixer_768_32 legacy_seresnet18 eca_resnet33ts vit_small_patch16_rope_224
""".split()


TIMM_SIZE = {"inception_v3": 75, "inception_v4": 75}  # their stems need 75x75 (64 leaves a 2x2 map for a 3x3 conv)


def timm_cases() -> list[Case]:
    try:
        import timm
    except ImportError:
        return []
    available = set(timm.list_models())
    cases = []
    for name in TIMM_MODELS:
        if name not in available:
            continue

        def build(name: str = name) -> tuple[nn.Module, InputsFn]:
            extra = TIMM_KWARGS.get(name, {})
            try:  # models with a fixed grid (ViTs, Swin, LeViT, ...) take img_size
                model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=64, **extra)
                size = 64
            except TypeError:
                model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **extra)
                cfg = getattr(model, "pretrained_cfg", {}) or {}
                size = TIMM_SIZE.get(name, max(64, int(cfg.get("min_input_size", (3, 64, 64))[-1])))
            return model, _images(size)

        tol, note = TOL.get(f"timm-{name}", (1e-9, ""))
        cases.append(
            Case(
                f"timm-{name}", "timm", build, noise=0.02, controls=CONTROLS.get(f"timm-{name}", 3), tol=tol, note=note
            )
        )
    return cases
