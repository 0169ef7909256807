"""AdvUnlearn on the toy world: it trains only the text-encoder parameters it is told to, with either attack.
Its erasure behaviour is tested in test_erasure_toy.py; its robustness (ASR against ESD-x's) in the slow test below
and in benchmarks/method_table.py."""

import pytest
import torch

from erasers.models import load_pipeline
from erasers.prompts import make_request
from erasers.registry import build_config, get_method

TINY = {"iterations": 3, "warmup": 1, "attack_steps": 2, "attack_every": 1, "ddim_steps": 4, "retain_batch": 1,
        "lr": 1e-3}


def run_advunlearn(concept: str, options: dict):
    loaded = load_pipeline("toy", device="cpu")
    before = {k: v.clone() for k, v in loaded.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in loaded.denoiser.state_dict().items()}
    config = build_config("advunlearn", True, options)
    request = make_request([concept], loaded.tokenizer, loaded.vocabulary)
    edited = get_method("advunlearn").eraser(config).erase(loaded, request)
    assert set(edited) == {"text_encoder"}
    assert all(torch.equal(v, unet_before[k]) for k, v in loaded.denoiser.state_dict().items()), "UNet untouched"
    changed = {k for k, v in edited["text_encoder"].state_dict().items() if not torch.equal(v, before[k])}
    return loaded, changed


@pytest.mark.parametrize("options, allowed, required", [
    ({"layers": "first"}, ("layers.0.",), ("layers.0.self_attn", "layers.0.mlp")),
    ({"layers": "first", "plain_weight": 1.0}, ("layers.0.",), ("layers.0.self_attn",)),
    ({"layers": "all", "component": "attn", "attack": "discrete", "attack_method": "sign", "attack_lr": 0.01},
     ("self_attn",), ("layers.0.self_attn", "layers.3.self_attn")),
    ({"layers": "all"}, ("encoder.layers.", "final_layer_norm"), ("layers.3.mlp", "final_layer_norm")),
    ({"layers": "first", "retain_latents": "per-step", "retain_batch": 2}, ("layers.0.",), ("layers.0.mlp",)),
])
def test_only_the_chosen_text_encoder_parameters_change(options, allowed, required):
    _, changed = run_advunlearn("arrow", {**TINY, **options})
    assert changed and all(any(a in name for a in allowed) for name in changed), sorted(changed)
    assert all(any(r in name for name in changed) for r in required), sorted(changed)
    assert not any("embeddings" in name for name in changed)


def test_bad_layer_choice_is_a_usage_error():
    from erasers.errors import UsageError

    with pytest.raises(UsageError, match="block indices 0..3"):
        run_advunlearn("arrow", {**TINY, "layers": "7"})


def test_bad_retain_latents_is_a_usage_error():
    from erasers.errors import UsageError

    with pytest.raises(UsageError, match="per-step or cached"):
        build_config("advunlearn", True, {"retain_latents": "fresh"})


def test_cached_retain_latents_hold_every_retain_prompts_trajectory_at_every_level():
    """retain_latents=cached: entry s holds each retain prompt's latent after s steps of the frozen model's
    sampling, at the timestep a step drawing s samples at; chunking does not mix prompts up."""
    from erasers.losses import sample_partially
    from erasers.methods.advunlearn import cached_trajectories

    loaded = load_pipeline("toy", device="cpu")
    config = build_config("advunlearn", True, {"ddim_steps": 5})
    retained = ["A star image in Dots style.", "A moon image in Rings style.", "A tree image in Stripes style."]
    with torch.no_grad():
        states, empty = loaded.encode_text(retained), loaded.adapter.unconditional()
        path = cached_trajectories(loaded, states, empty, config, chunk=2)
        _, t_step = sample_partially(loaded, loaded.denoiser, states[:1], empty, 2, 5, 3.0, torch.Generator())
    assert len(path) == config.ddim_steps - 1 and all(latents.shape[0] == 3 for latents, _ in path)
    assert int(path[2][1]) == int(t_step)
    last = path[-1][0]
    assert not torch.allclose(last[0], last[1]) and not torch.allclose(last[1], last[2])
    # The same seed gives the same cache: a resumed run trains on the same retain latents.
    again = cached_trajectories(loaded, states, empty, config, chunk=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(path, again))


@pytest.mark.slow
def test_advunlearn_resists_the_attack_better_than_esd_x(tmp_path):
    """AdvUnlearn's point: the attack brings the concept back less often than after ESD-x. Minutes of CPU (two
    default erasures, 20 attacks each), so it runs with -m slow; benchmarks/method_table.py reports the figures."""
    from benchmarks.attack import attack_success_rate
    from erasers.run import erase

    asr = {}
    for method in ("esd-x", "advunlearn"):
        edit = erase("toy", method, ["arrow"], tmp_path / method, device="cpu")
        asr[method] = attack_success_rate("toy", [edit], count=20, device="cpu", progress=False)["asr"]
    assert asr["advunlearn"] <= asr["esd-x"] - 0.15, asr
