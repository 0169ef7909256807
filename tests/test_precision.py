"""Mixed precision and memory on the tiny random pipelines (bf16 frozen weights, fp32 trained parameters, the frozen
teacher without a second denoiser, gradient checkpointing, the precision options), and the scripts that measure
them: benchmarks/gpu_check.py's CPU mode and benchmarks/step_cost.py's SDXL rows."""

import dataclasses
import sys

import numpy as np
import pytest
import torch

from erasers import UsageError, load_pipeline
from erasers.edits import apply_edits, read_edit
from erasers.losses import predict_noise
from erasers.precision import TrainingOptions, autocast, build_optimizer, make_trainable
from erasers.prompts import make_request
from erasers.registry import REGISTRY, build_config, get_method
from erasers.run import erase

FAMILIES = ("sd", "sdxl", "flux")
CONCEPT, UNRELATED = "star", "dog"


def test_bf16_frozen_weights_train_fp32_parameters(bases):
    """Mixed precision on the tiny SD pipeline: frozen weights in bf16, trained parameters in fp32 after the steps,
    moved, finite losses; the saved component is float32 and loads back."""
    loaded = bases("sd")
    loaded.pipeline.to(dtype=torch.bfloat16)
    loaded.training = TrainingOptions("bf16")
    from erasers.parameters import trainable_parameters

    trained_names = {id(p) for p in trainable_parameters(loaded, "xattn")}
    start = {name: p.detach().float().clone() for name, p in loaded.denoiser.named_parameters()
             if id(p) in trained_names}
    eraser = get_method("esd-x").eraser(build_config("esd-x", False, {"iterations": 3, "ddim_steps": 4, "lr": 1e-3}))
    with autocast(loaded):
        unet = eraser.erase(loaded, make_request([CONCEPT], loaded.tokenizer, None))["unet"]
    assert all(np.isfinite(row["loss"]) for row in eraser.history)
    assert unet.dtype == torch.float32, "the edit is saved in float32"
    moved = [name for name, p in unet.named_parameters() if name in start and not torch.equal(p, start[name])]
    assert moved and len(moved) == len(start)
    assert loaded.text_encoder.dtype == torch.bfloat16, "frozen components stay in half precision"


def test_trained_parameters_stay_fp32_through_the_optimiser_steps(bases):
    loaded = bases("sd")
    loaded.pipeline.to(dtype=torch.bfloat16)
    loaded.training = TrainingOptions("bf16")
    parameters = make_trainable(loaded, list(loaded.denoiser.conv_in.parameters()), loaded.denoiser)
    optimizer = build_optimizer(loaded, parameters, 1e-2)
    latents = torch.randn(loaded.adapter.latent_shape(1))
    for _ in range(2):
        with autocast(loaded):
            loss = predict_noise(loaded.denoiser, latents, 10, loaded.encode_text(["a star"])).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.dtype == torch.float32 and p.grad is None for p in parameters)
    assert loaded.denoiser.conv_out.weight.dtype == torch.bfloat16
    with pytest.raises(UsageError, match="not float32"):
        build_optimizer(loaded, [loaded.denoiser.conv_out.weight], 1e-2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_frozen_teacher_is_the_untrained_denoiser_without_a_second_copy(bases, family, precision):
    """The teacher ESD, DoCo and Co-Erasing read is the denoiser itself with its trained parameters' original values
    swapped in: it predicts what the untrained denoiser did after the student has moved, and it keeps only the
    trained tensors (a fraction of the denoiser, in the frozen weights' dtype), leaving the module's mode and gradients
    as they were."""
    from erasers.losses import FrozenOriginal
    from erasers.parameters import trainable_parameters

    loaded = bases(family)
    if precision == "bf16":
        loaded.pipeline.to(dtype=torch.bfloat16)
    loaded.training = TrainingOptions(precision)
    denoiser = loaded.denoiser
    parameters = make_trainable(loaded, trainable_parameters(loaded, "xattn"), denoiser)
    teacher = FrozenOriginal(denoiser, parameters)
    latents = torch.randn(loaded.adapter.latent_shape(2), generator=torch.Generator().manual_seed(0)).to(denoiser.dtype)
    cond = loaded.encode_text([CONCEPT, UNRELATED])
    with torch.no_grad(), autocast(loaded):
        untrained = predict_noise(denoiser, latents, 500, cond)
        for parameter in parameters:  # what training does to the student
            parameter.add_(torch.randn_like(parameter))
        moved = predict_noise(denoiser, latents, 500, cond)
    denoiser.train()
    frozen_block = next(m for m in denoiser.modules() if m is not denoiser)
    frozen_block.eval()  # modes are the caller's: the teacher leaves a mixed one as it found it
    with autocast(loaded):
        taught = predict_noise(teacher, latents, 500, cond)
    assert not torch.allclose(moved, untrained)
    assert torch.equal(taught, untrained) and not taught.requires_grad
    assert denoiser.training and not frozen_block.training and all(p.requires_grad for p in parameters)
    kept = sum(t.numel() for t in teacher.originals.values())
    assert kept == sum(p.numel() for p in parameters) < sum(p.numel() for p in denoiser.parameters()) / 2
    # kept in the frozen weights' dtype (exact: the fp32 trained parameters were upcast from it)
    trained_ids = {id(p) for p in parameters}
    frozen_dtype = next(p.dtype for p in denoiser.parameters() if id(p) not in trained_ids)
    assert all(t.dtype == frozen_dtype for t in teacher.originals.values())


def test_each_optimiser_step_reaches_the_next_forward_under_the_erase_autocast(bases):
    """An erase runs its whole loop inside one `autocast(loaded)`: the half-precision copies autocast makes of the
    float32 trained parameters must not be cached across steps, or every forward reads the weights of step 0."""
    loaded = bases("sd")
    loaded.pipeline.to(dtype=torch.bfloat16)
    loaded.training = TrainingOptions("bf16")
    parameters = make_trainable(loaded, list(loaded.denoiser.conv_in.parameters()), loaded.denoiser)
    optimizer = build_optimizer(loaded, parameters, 1e-1)
    latents = torch.randn(loaded.adapter.latent_shape(1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = loaded.encode_text(["a star"])
    losses = []
    with autocast(loaded):
        for _ in range(3):
            loss = predict_noise(loaded.denoiser, latents, 10, cond).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0], losses


def test_gradient_checkpointing_gives_the_same_gradients(bases):
    grads = []
    for checkpointing in (False, True):
        loaded = bases("sdxl")
        loaded.training = TrainingOptions("fp32", gradient_checkpointing=checkpointing)
        from erasers.parameters import trainable_parameters

        parameters = make_trainable(loaded, trainable_parameters(loaded, "xattn"), loaded.denoiser)
        loaded.denoiser.train()
        latents = torch.randn(loaded.adapter.latent_shape(1), generator=torch.Generator().manual_seed(0))
        predict_noise(loaded.denoiser, latents, 10, loaded.encode_text(["a star"])).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in parameters]))
        assert loaded.denoiser.is_gradient_checkpointing == checkpointing
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_precision_options_are_checked(tiny_pipeline_dirs, tmp_path, monkeypatch):
    sd = str(tiny_pipeline_dirs["sd"])
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        erase(sd, "esd-x", [CONCEPT], tmp_path / "a", device="cpu", precision="fp16")
    with pytest.raises(UsageError, match="--precision must be one of"):
        TrainingOptions("int8")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importing it now fails, as when it is not installed
    with pytest.raises(UsageError, match="needs bitsandbytes"):
        erase(sd, "esd-x", [CONCEPT], tmp_path / "b", options={"iterations": "1", "ddim_steps": "4"}, device="cpu",
              optimizer="adam8bit")
    with pytest.raises(UsageError, match="multiple of 16"):
        erase(sd, "esd-x", [CONCEPT], tmp_path / "c", device="cpu", resolution=20)


def test_erase_in_bf16_saves_an_fp32_edit_with_its_training_options(tiny_pipeline_dirs, tmp_path):
    out = erase(str(tiny_pipeline_dirs["sdxl"]), "esd-x", [CONCEPT], tmp_path / "edit",
                options={"iterations": "2", "ddim_steps": "4"}, device="cpu", precision="bf16",
                gradient_checkpointing=True)
    meta = read_edit(out)
    assert meta["training"] == {"precision": "bf16", "gradient_checkpointing": True, "optimizer": "adam"}
    loaded = load_pipeline(str(tiny_pipeline_dirs["sdxl"]), device="cpu")
    unet = type(loaded.denoiser).from_pretrained(out / "unet")
    assert unet.dtype == torch.float32
    apply_edits(loaded, [out])
    assert loaded.generate([CONCEPT], steps=2, progress=False)[0].size == (16, 16)


def test_gpu_check_runs_every_method_on_the_tiny_pipelines(capsys):
    """benchmarks/gpu_check.py's CPU mode: finite losses and moved parameters for each method x family, and the
    table of seconds per step against the plain forward+backward. (Its CUDA run needs a GPU.)"""
    from benchmarks.gpu_check import main

    code = main(["--tiny", "--steps", "1", "--families", "flux", "--methods", "esd-te,uce"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| flux")]
    assert len(rows) == 3 and all(line.endswith("| yes | yes |") for line in rows), out


def test_gpu_check_runs_fmn_with_its_text_stage_and_checks_every_component(capsys):
    """FMN's edit holds the denoiser and both SDXL text encoders (two steps of its text stage): each must move."""
    from benchmarks.gpu_check import main

    code = main(["--tiny", "--steps", "1", "--families", "sdxl", "--methods", "fmn"])
    out = capsys.readouterr().out
    assert code == 0, out
    row = next(line for line in out.splitlines() if line.startswith("| sdxl | fmn"))
    assert row.endswith("| yes | yes |"), out


def test_gpu_check_times_training_free_methods_as_sampling_steps(capsys):
    """SLD and negative prompts train nothing: the GPU check times a sampling step with the edit installed against a
    plain one (SLD adds a third of the guidance batch), and checks the result moved."""
    from benchmarks.gpu_check import main

    code = main(["--tiny", "--steps", "2", "--families", "sd15,flux", "--methods", "sld,negprompt"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith(("| sd15", "| flux"))]
    assert [line.split("|")[1:3] for line in rows] == [[" sd15 ", " plain "], [" sd15 ", " sld "],
                                                       [" sd15 ", " negprompt "], [" flux ", " plain "],
                                                       [" flux ", " negprompt "]], out
    assert all(line.endswith("| yes | yes |") for line in rows) and "(sampling)" in rows[1], out


def test_gpu_check_runs_doco_and_coerasing_on_every_family(capsys, monkeypatch):
    """DoCo and Co-Erasing in the GPU check, Co-Erasing with a random IP-Adapter (published layout) and refinement
    CLIP written for each family's denoiser. A method whose eraser does not take a family is skipped there, not
    failed, and a family none of the asked methods applies to gets no plain row."""
    from benchmarks.gpu_check import main

    code = main(["--tiny", "--steps", "1", "--families", "sd15,sdxl,flux", "--methods", "doco,coerasing"])
    captured = capsys.readouterr()
    assert code == 0, captured.out
    rows = [line for line in captured.out.splitlines() if line.startswith(("| sd15", "| sdxl", "| flux"))]
    expected = [[f" {family} ", f" {method} "] for family in ("sd15", "sdxl", "flux")
                for method in ("plain", "doco", "coerasing")]
    assert [line.split("|")[1:3] for line in rows] == expected, rows
    assert all(line.endswith("| yes | yes |") for line in rows), captured.out

    monkeypatch.setitem(REGISTRY.entries, "coerasing", dataclasses.replace(get_method("coerasing"), families=("sd",)))
    code = main(["--tiny", "--steps", "1", "--families", "flux", "--methods", "coerasing"])
    captured = capsys.readouterr()
    assert code == 0 and not [line for line in captured.out.splitlines() if line.startswith("| flux")], captured.out
    assert "flux/coerasing: does not apply" in captured.err


def test_step_cost_runs_sdxl_with_gradient_checkpointing(tiny_pipeline_dirs, monkeypatch):
    """benchmarks/step_cost.py's SDXL rows (the tiny SDXL pipeline standing in for the full architecture, at its
    own 32 px rather than 512): the plain step encodes the prompt, lets the text encoders go and steps the UNet
    with gradient checkpointing, as the method steps do."""
    import benchmarks.architectures
    from benchmarks import step_cost

    monkeypatch.setattr(benchmarks.architectures, "build_architecture",
                        lambda family: load_pipeline(str(tiny_pipeline_dirs[family]), device="cpu").pipeline)
    monkeypatch.setitem(step_cost.SETTINGS, "sdxl", (32, True))
    loaded = step_cost.build_loaded("sdxl")
    pixels = [side * loaded.pipeline.vae_scale_factor for side in loaded.adapter.latent_shape(1)[-2:]]
    assert loaded.training.gradient_checkpointing and pixels == [32, 32]
    for method in ("plain", "esd-x"):
        row = step_cost.measure("sdxl", method, 1)
        assert row["seconds_per_step"] > 0 and row["peak_rss_bytes"] > 0, row


def test_loading_an_ip_adapter_keeps_the_mixed_precision_dtypes(bases, tmp_path):
    """diffusers' IP-Adapter loader casts the whole UNet to its first parameter's dtype. Under bf16 mixed precision
    that turned Co-Erasing's fp32 trained parameters (stage 1) into bf16 before stage 2, whose Adam state is fp32:
    each parameter must keep its dtype and value, and the adapter's frozen layers take the frozen weights' dtype."""
    from tiny_pipelines import random_ip_adapter_options

    from erasers import ip_adapter
    from erasers.parameters import trainable_parameters

    files = ip_adapter.adapter_files(random_ip_adapter_options(bases("sd"), tmp_path)["ip_adapter"], "sd")
    loaded = bases("sd")
    loaded.pipeline.to(dtype=torch.bfloat16)
    loaded.training = TrainingOptions("bf16")
    trained = make_trainable(loaded, trainable_parameters(loaded, "xattn"), loaded.denoiser)
    with torch.no_grad():
        for parameter in trained:
            parameter.add_(1e-3 * torch.randn_like(parameter))  # a value bf16 cannot hold
    before = {name: p.detach().clone() for name, p in loaded.denoiser.named_parameters()}
    trained_ids = {id(p) for p in trained}
    assert {before[n].dtype for n, p in loaded.denoiser.named_parameters() if id(p) in trained_ids} == {torch.float32}
    ip_adapter.load_ip_adapter(loaded, **files)
    after = dict(loaded.denoiser.named_parameters())
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    added = [p for name, p in after.items() if name not in before]
    assert added and {p.dtype for p in added} == {torch.bfloat16}


@pytest.mark.parametrize("method", ["esd-te", "advunlearn"])
def test_gradient_checkpointing_recomputes_the_text_encoder_it_trains(bases, method):
    """transformers checkpoints only a model in training mode: ESD-te kept its encoder in eval mode, so
    --gradient-checkpointing did nothing there (on Flux, all of T5-XXL's activations kept). With checkpointing, the
    backward pass runs each encoder layer's forward again."""
    options = {"esd-te": {"iterations": 2, "ddim_steps": 4},
               "advunlearn": {"iterations": 2, "warmup": 2, "attack_steps": 1, "ddim_steps": 4, "retain_batch": 1}}
    forwards = []
    for checkpointing in (False, True):
        loaded = bases("sd")
        loaded.training = TrainingOptions("fp32", gradient_checkpointing=checkpointing)
        calls = []
        fc1 = loaded.text_encoder.encoder.layers[0].mlp.fc1
        forward = fc1.forward
        fc1.forward = lambda x: (calls.append(1), forward(x))[1]  # a recompute runs no module hooks
        config = build_config(method, False, options[method])
        get_method(method).eraser(config).erase(loaded, make_request([CONCEPT], loaded.tokenizer, None))
        forwards.append(len(calls))
    assert forwards[1] > forwards[0] > 0, forwards


def test_coerasing_draws_its_concept_images_with_the_vae_upcast_kept(bases):
    """Co-Erasing draws the concept's images inside the erase's autocast. SDXL's pipeline upcasts its fp16 VAE to
    decode (force_upcast: it overflows in fp16), which fp16 autocast undid: the decode must run in fp32."""
    from erasers.methods.coerasing import concept_images

    loaded = bases("sdxl")
    loaded.pipeline.to(dtype=torch.float16)
    loaded.training = TrainingOptions("fp16")
    outputs = []
    loaded.pipeline.vae.decoder.conv_in.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    config = build_config("coerasing", False, {"image_count": 1})
    with autocast(loaded):
        images = concept_images(loaded, make_request([CONCEPT], loaded.tokenizer, None), config, None)
    assert len(images) == 1 and outputs == [torch.float32]
