"""SAUCE: concept unlearning in a VLM by clamping sparse-autoencoder features at inference.

1. Cache one decoder layer's hidden states at every prompt position of image questions, concept and neutral alike.
2. Train a TopK sparse autoencoder on them (vlm.sae).
3. Score every feature by how specific it is to the concept: the share of concept prompts on which it fires
   minus the share of neutral prompts, with its mean activation on concept tokens over that on neutral tokens
   breaking ties; keep the `features` best with a positive score.
4. At inference a hook re-encodes the layer's output and, wherever a chosen feature fires, clamps it to zero
   (`clamp="zero"`) or to `clamp_value` times its mean activation where it fires on the concept
   (`clamp="negative"`, which LLM unlearning found removes knowledge where zeroing does not), adding the change
   through the decoder so the autoencoder's reconstruction error is kept: h' = h + (z_clamped - z) W_dec.
Where no chosen feature fires (neutral inputs) the output is exactly unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from erasers.errors import UsageError

from ..edits import edit_layer, edit_tensor, text_config
from ..forward import token_states_per_item
from ..registry import EditContent, VLMEraser, register_vlm
from ..sae import SAETraining, SparseAutoencoder, train_sae


@dataclass
class SauceConfig:
    layer: int = -1  # decoder layer whose output is edited; -1: a quarter of the way up
    concept_images: int = 24
    neutral_images: int = 96
    features: int = 48
    clamp: str = "negative"  # "zero" or "negative"
    clamp_value: float = -2.0  # in units of each feature's mean activation where it fires on concept tokens
    expansion: int = 8
    k: int = 16
    sae_steps: int = 1500
    batch_size: int = 512
    lr: float = 1e-3
    seed: int = 0


def feature_scores(z_concept: list[torch.Tensor], z_neutral: list[torch.Tensor]) -> tuple[torch.Tensor,
                                                                                       torch.Tensor]:
    """(specificity score, mean activation on the concept tokens where it fires) per feature, from per-prompt
    feature activations (tokens, features)."""
    fires_concept = torch.stack([(z > 0).any(0).float() for z in z_concept]).mean(0)
    fires_neutral = torch.stack([(z > 0).any(0).float() for z in z_neutral]).mean(0)
    concept, neutral = torch.cat(z_concept), torch.cat(z_neutral)
    mean_concept, mean_neutral = concept.mean(0), neutral.mean(0)
    ratio = mean_concept / (mean_concept + mean_neutral + 1e-6)
    # The typical size of a feature where it fires on the concept, the unit of a negative clamp.
    firing = (concept > 0).sum(0).clamp(min=1)
    return fires_concept - fires_neutral + 1e-3 * ratio, concept.sum(0) / firing


# Measured on the toy VLM (benchmarks/results/NOTES.md, "The VLM methods' toy defaults", has the runs): on the phase-4
# model the first layer's features are the ones that also carry the star into multiple-choice prompts in wordings no
# eraser saw (clamped at layer 1, those still answer); a mild clamp keeps retain.
@register_vlm("sauce", "SAUCE: sparse-autoencoder features of the concept clamped at inference (training-free "
              "for the model)", toy_defaults={"layer": 0, "sae_steps": 400, "clamp_value": -0.75})
class Sauce(VLMEraser):
    config_class = SauceConfig

    def erase(self, loaded, target, work_dir=None) -> EditContent:
        cfg = self.config
        if cfg.clamp not in ("zero", "negative"):
            raise UsageError(f"sauce option clamp must be 'zero' or 'negative', not {cfg.clamp!r}")
        layer = cfg.layer % len(loaded.layers) if cfg.layer >= 0 else len(loaded.layers) // 4
        concept = target.concept_images(cfg.concept_images)
        neutral = target.neutral_images(cfg.neutral_images)
        # Per prompt, so "fires on this prompt" can be counted; together they train the autoencoder.
        per_prompt = token_states_per_item(loaded, concept + neutral, layer)
        training = SAETraining(cfg.expansion, cfg.k, cfg.sae_steps, cfg.batch_size, cfg.lr, cfg.seed)
        sae, quality = train_sae(torch.cat(per_prompt), training, work_dir=work_dir)
        with torch.no_grad():
            codes = [sae.encode(states) for states in per_prompt]
        scores, mean_concept = feature_scores(codes[:len(concept)], codes[len(concept):])
        order = scores.argsort(descending=True)[:cfg.features]
        chosen = order[scores[order] > 0]
        values = torch.zeros(len(chosen)) if cfg.clamp == "zero" else cfg.clamp_value * mean_concept[chosen]
        info = {"layer": layer, "features": chosen.tolist(), "scores": [round(float(s), 4) for s in scores[chosen]],
                "clamp_values": [round(float(v), 4) for v in values], "sae": {**asdict(training), **quality},
                "concept_prompts": len(concept), "neutral_prompts": len(neutral)}
        tensors = {**sae.tensors(), "features": chosen, "clamp_values": values}
        return EditContent(tensors=tensors, info=info)

    @staticmethod
    def check_edit(loaded, tensors, config, info):
        edit_layer(loaded, info.get("layer"), "layer")
        hidden = text_config(loaded).hidden_size
        features = edit_tensor(tensors, "sae.decoder", (None, hidden)).shape[0]
        for name, shape in (("sae.encoder.weight", (features, hidden)), ("sae.encoder.bias", (features,)),
                            ("sae.bias", (hidden,))):
            edit_tensor(tensors, name, shape)
        chosen = edit_tensor(tensors, "features", (None,))  # saved as floats, like every tensor of an edit
        if len(chosen) and not ((chosen == chosen.round()).all() and chosen.min() >= 0 and chosen.max() < features):
            raise UsageError(f"its features are not indices of the autoencoder's {features} features")
        edit_tensor(tensors, "clamp_values", (len(chosen),))
        k = config.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= features:
            raise UsageError(f"its config's k is {k!r}, not a count of 1 to {features} features")

    @staticmethod
    def layer_edits(loaded, tensors, config, info):
        sae = SparseAutoencoder.from_tensors(tensors, config["k"]).to(loaded.device)
        features = tensors["features"].long().to(loaded.device)
        values = tensors["clamp_values"].to(loaded.device)
        directions = sae.decoder[features].detach()

        def clamp(hidden: torch.Tensor) -> torch.Tensor | None:
            if len(features) == 0:
                return None
            with torch.no_grad():
                z = sae.encode(hidden)[..., features]
                clamped = torch.where(z > 0, values.to(z.dtype), z)
                return hidden + ((clamped - z) @ directions).to(hidden.dtype)

        return {int(info["layer"]): clamp}
