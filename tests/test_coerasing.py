"""Co-Erasing and its IP-Adapter: the published IP-Adapter format loads through diffusers on tiny random components;
the toy IP-Adapter conditions generation on an image's object; the text-guided refinement moves image embeddings
toward the concept's text; Co-Erasing saves a loadable UNet edit, refuses bad image folders, and (slow) erases the
arrow under text and image conditioning while other objects hold."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_pipelines import IMAGE_DIM, TINY_IMAGE_ENCODER, TINY_REFINE_CLIP, clip_text_config, random_ip_adapter_options

from apps.cli import main
from benchmarks.toycanvas import CLASSIFIER_DIR, CLIP_DIR, IP_ADAPTER_DIR
from benchmarks.toycanvas.build.train_ip_adapter import conditioning_images
from benchmarks.toycanvas.classifier import ToyClassifier
from benchmarks.toycanvas.render import sample_image
from benchmarks.toycanvas.world import OBJECTS, VOCABULARY
from erasers import UsageError, ip_adapter, load_pipeline
from erasers.edits import apply_edits, read_edit
from erasers.methods.coerasing import concept_direction, image_files, read_images, refine_embeddings
from erasers.prompts import make_request
from erasers.registry import build_config
from erasers.run import erase


def tiny_image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_IMAGE_ENCODER))


def write_published_adapter(folder: Path, unet, weight_name: str) -> dict[str, torch.Tensor]:
    """A random SD IP-Adapter in the published layout: image_proj.{proj,norm}.*, ip_adapter.{1,3,5,...}.to_{k,v}_ip
    (the index of each attn2 among the UNet's attention processors), and image_encoder/."""
    generator = torch.Generator().manual_seed(1)
    width = unet.config.cross_attention_dim
    state = {"image_proj.proj.weight": torch.randn(4 * width, IMAGE_DIM, generator=generator),
             "image_proj.proj.bias": torch.randn(4 * width, generator=generator),
             "image_proj.norm.weight": torch.ones(width), "image_proj.norm.bias": torch.zeros(width)}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
            for kind in ("k", "v"):
                state[f"ip_adapter.{index}.to_{kind}_ip.weight"] = torch.randn(hidden, width, generator=generator)
    folder.mkdir(parents=True)
    save_file(state, str(folder / weight_name))
    tiny_image_encoder().save_pretrained(folder / "image_encoder")
    return state


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_published_ip_adapter_loads_on_tiny_unets(tiny_pipeline_dirs, tmp_path, family):
    """diffusers' loader on the published layout; on SDXL the image embeddings join the pooled text and size ids."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    loaded = load_pipeline(str(tiny_pipeline_dirs[family]), device="cpu")
    state = write_published_adapter(tmp_path / "repo" / "models", loaded.denoiser, "ip-adapter_sd15.safetensors")
    ip_adapter.load_ip_adapter(loaded, tmp_path / "repo", subfolder="models", weight_name="ip-adapter_sd15.safetensors")
    unet = loaded.denoiser
    processors = unet.attn_processors
    assert all(isinstance(p, IPAdapterAttnProcessor2_0) == name.endswith("attn2.processor")
               for name, p in processors.items())
    # The file's weights are where diffusers put them, and read back in the same format.
    saved = ip_adapter.ip_adapter_state_dict(unet)
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)

    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8))
              for i in range(2)]
    embeds = ip_adapter.encode_images(loaded, images)
    assert embeds.shape == (2, IMAGE_DIM)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = loaded.encode_text(["a star", "a star"]).detach()
    with torch.no_grad():
        with_image = ip_adapter.predict_noise_with_images(unet, latents, 10, text, embeds)
        without = ip_adapter.predict_noise_with_images(unet, latents, 10, text, torch.zeros_like(embeds))
    assert (with_image - without).abs().max() > 1e-3, "the image embedding must change the prediction"
    generated = ip_adapter.generate_with_images(loaded, ["a star"] * 2, embeds, [0, 1], steps=2, progress=False)
    assert len(generated) == 2


def test_each_prompt_of_a_batch_is_conditioned_on_its_own_image(tiny_pipeline_dirs, tmp_path):
    # diffusers' SD pipeline repeats one image prompt for a whole batch; per-prompt images must not blend.
    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    write_published_adapter(tmp_path / "adapter", loaded.denoiser, "ip-adapter.safetensors")
    ip_adapter.load_ip_adapter(loaded, tmp_path / "adapter")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8))
              for i in range(3)]
    embeds = ip_adapter.encode_images(loaded, images)

    def generate(indices, batch_size):
        return [np.asarray(image, np.int16) for image in ip_adapter.generate_with_images(
            loaded, ["a star"] * len(indices), embeds[indices], [0] * len(indices), steps=2, batch_size=batch_size,
            progress=False)]

    together = generate([0, 1, 2], batch_size=3)
    alone = [generate([i], batch_size=1)[0] for i in range(3)]
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(together, alone))
    assert np.abs(alone[0] - alone[1]).max() > 1, "different images must give different generations"
    with pytest.raises(UsageError, match="one image embedding and one seed per prompt"):
        ip_adapter.generate_with_images(loaded, ["a star"] * 2, embeds, [0, 1], progress=False)


def test_the_default_adapter_is_the_familys_published_one():
    assert ip_adapter.adapter_files("", "sd") == {
        "source": "h94/IP-Adapter", "subfolder": "models", "weight_name": "ip-adapter_sd15.safetensors",
        "image_encoder_folder": "image_encoder", "image_encoder": None}
    # SDXL's ViT-H adapter reads SD 1.5's image encoder (a path with a slash: from the repository's root), so the
    # refinement CLIP is the same; Flux's XLabs adapter names CLIP ViT-L/14 as its encoder.
    sdxl, flux = ip_adapter.adapter_files("", "sdxl"), ip_adapter.adapter_files("", "flux")
    assert (sdxl["subfolder"], sdxl["weight_name"], sdxl["image_encoder_folder"]) == (
        "sdxl_models", "ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder")
    assert ip_adapter.PUBLISHED["sdxl"].text_clip == ip_adapter.PUBLISHED["sd"].text_clip
    assert (flux["source"], flux["image_encoder"]) == ("XLabs-AI/flux-ip-adapter", "openai/clip-vit-large-patch14")
    assert ip_adapter.adapter_files("h94/IP-Adapter", "sdxl", "sdxl_models", "ip-adapter_sdxl.safetensors") == {
        "source": "h94/IP-Adapter", "subfolder": "sdxl_models", "weight_name": "ip-adapter_sdxl.safetensors"}
    assert ip_adapter.adapter_files("my/adapter", "sd") == {
        "source": "my/adapter", "subfolder": None, "weight_name": "ip-adapter.safetensors"}


def test_missing_ip_adapter_is_a_usage_error(tiny_pipeline_dirs, tmp_path):
    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no ip-adapter.safetensors"):
        ip_adapter.load_ip_adapter(loaded, tmp_path / "empty")


def test_mlp_projection_adapter_saves_and_loads_through_diffusers(tiny_pipeline_dirs, tmp_path):
    # The toy adapter's layout: an MLP projection to more than 4 tokens, which diffusers loads as its FaceID
    # projection and reads the token count from.
    from diffusers.models.embeddings import IPAdapterFaceIDImageProjection

    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    encoder = tiny_image_encoder()
    with pytest.raises(UsageError, match="has 4 tokens"):
        ip_adapter.add_ip_adapter(loaded, encoder, tokens=6)
    ip_adapter.add_ip_adapter(loaded, encoder, tokens=6, hidden_multiplier=2)
    projection = loaded.denoiser.encoder_hid_proj.image_projection_layers[0]
    with torch.no_grad():
        for parameter in projection.parameters():  # away from the init, so the round trip is checked on weights
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    (tmp_path / "adapter").mkdir()
    ip_adapter.save_ip_adapter(loaded.denoiser, encoder, tmp_path / "adapter", dtype=torch.float32)

    reloaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    ip_adapter.load_ip_adapter(reloaded, tmp_path / "adapter")
    projection_back = reloaded.denoiser.encoder_hid_proj.image_projection_layers[0]
    assert isinstance(projection_back, IPAdapterFaceIDImageProjection) and projection_back.num_tokens == 6
    saved, back = ip_adapter.ip_adapter_state_dict(loaded.denoiser), ip_adapter.ip_adapter_state_dict(reloaded.denoiser)
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    embeds = torch.randn(2, IMAGE_DIM, generator=torch.Generator().manual_seed(3))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = loaded.encode_text(["a star", "a star"]).detach()
    with torch.no_grad():
        before = ip_adapter.predict_noise_with_images(loaded.denoiser, latents, 10, text, embeds)
        after = ip_adapter.predict_noise_with_images(reloaded.denoiser, latents, 10, text, embeds)
        blank = ip_adapter.predict_noise_with_images(reloaded.denoiser, latents, 10, text, torch.zeros_like(embeds))
    assert torch.allclose(before, after, atol=1e-5)
    assert (after - blank).abs().max() > 1e-3, "the image embedding must change the prediction"


# The toy adapter's bar (weights/ip_adapter/quality.json, 100 generations) is 80%; the shipped one reaches 81% with
# the empty prompt (chance 10%). On these 10 generations: generation follows the image's object far above chance.
# (Until the batch fix in generate_with_images every adapter measured at chance.)
def test_toy_ip_adapter_conditions_generation_on_the_images_object():
    loaded = load_pipeline("toy", device="cpu")
    ip_adapter.load_ip_adapter(loaded, IP_ADAPTER_DIR)
    names, images = conditioning_images(1)
    embeds = ip_adapter.encode_images(loaded, images)
    generated = ip_adapter.generate_with_images(loaded, [""] * len(images), embeds, list(range(len(images))),
                                                progress=False)
    predicted = ToyClassifier.from_pretrained(CLASSIFIER_DIR).predict(generated)[0]
    accuracy = np.mean([p == t for p, t in zip(predicted, names)])
    assert accuracy >= 0.6, list(zip(names, predicted))


def test_refinement_moves_image_embeddings_toward_the_concept_text():
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    # The toy IP-Adapter's image encoder is the toy CLIP's vision tower: embeddings in the same joint space.
    vision = CLIPVisionModelWithProjection.from_pretrained(CLIP_DIR)
    processor = CLIPImageProcessor.from_pretrained(CLIP_DIR)

    def encode(images):
        with torch.no_grad():
            return vision(processor(images=images, return_tensors="pt").pixel_values).image_embeds

    request = make_request(["arrow"], load_pipeline("toy", device="cpu").tokenizer,
                           VOCABULARY)
    direction = concept_direction(CLIPTextModelWithProjection.from_pretrained(CLIP_DIR),
                                  AutoTokenizer.from_pretrained(CLIP_DIR), request, request.erase_prompts())
    arrows = encode([sample_image("arrow", None, seed)[0] for seed in range(8)])
    others = encode([sample_image(o, None, 50 + i)[0] for i, o in enumerate(OBJECTS) if o != "arrow"])
    # The text direction is one the arrow images share and other objects' images lack.
    assert (arrows @ direction).mean() > (others @ direction).mean()
    refined = refine_embeddings(arrows, direction, 0.8)
    cosine = torch.nn.functional.cosine_similarity
    assert (cosine(refined, direction[None]) > cosine(arrows, direction[None])).all()
    assert torch.allclose(refined.norm(dim=-1), arrows.norm(dim=-1), rtol=1e-4)
    # What the images show besides the arrow (colour, style, pose) shrinks: their spread around the mean drops.
    assert (refined - refined.mean(0)).norm() < (arrows - arrows.mean(0)).norm()
    assert torch.allclose(refine_embeddings(arrows, direction, 0.0), arrows, atol=1e-5)


def test_coerasing_saves_a_plain_unet_edit_on_tiny_sd(tiny_pipeline_dirs, clip_tokenizer_dir, tmp_path):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    write_published_adapter(tmp_path / "adapter", loaded.denoiser, "ip-adapter.safetensors")
    clip = tmp_path / "refine-clip"
    CLIPTextModelWithProjection(clip_text_config(**TINY_REFINE_CLIP)).save_pretrained(clip)
    CLIPTokenizer.from_pretrained(clip_tokenizer_dir).save_pretrained(clip)
    options = {"text_iterations": 2, "image_iterations": 2, "ddim_steps": 4, "image_count": 3,
               "ip_adapter": str(tmp_path / "adapter"), "refine_clip": str(clip)}
    out = erase(str(tiny_pipeline_dirs["sd"]), "coerasing", ["a star"], tmp_path / "edit", options=options,
                device="cpu")
    meta = read_edit(out)
    assert meta["method"] == "coerasing" and meta["components"] == ["unet"] and meta["config"]["refine"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "edit", "refine-clip"]
    # The edit is a plain UNet (no image projection): it loads into the base pipeline without an adapter.
    base = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    apply_edits(base, [out])
    assert base.denoiser.encoder_hid_proj is None
    assert base.generate(["a star"], seeds=0, steps=2, progress=False)


def test_flux_ip_adapter_saves_loads_and_conditions_the_transformer(tiny_pipeline_dirs, tmp_path):
    """XLabs' layout through diffusers' FluxIPAdapterMixin: the saved file (IP keys/values with biases per joint
    block) loads back with its image encoder, and the image embedding reaches the transformer's prediction."""
    loaded = load_pipeline(str(tiny_pipeline_dirs["flux"]), device="cpu")
    loaded.resolution = 16
    random_ip_adapter_options(loaded, tmp_path)
    saved = load_file(tmp_path / "adapter" / "ip-adapter.safetensors")
    # One IP layer pair, with biases, per joint block; none in the single blocks.
    ip_layers = {k.split(".")[1] for k in saved if k.startswith("ip_adapter.")}
    assert ip_layers == {str(i) for i in range(loaded.denoiser.config.num_layers)}
    assert "ip_adapter.0.to_k_ip.bias" in saved and "ip_adapter.0.to_v_ip.bias" in saved
    ip_adapter.load_ip_adapter(loaded, tmp_path / "adapter")
    back = ip_adapter.ip_adapter_state_dict(loaded.denoiser)
    assert back.keys() == saved.keys() and all(torch.equal(back[k], saved[k]) for k in saved)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8))
              for i in range(2)]
    embeds = ip_adapter.encode_images(loaded, images)
    latents = torch.randn(loaded.adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
    text = loaded.encode_text(["a star", "a star"])
    with torch.no_grad():
        with_image = ip_adapter.predict_noise_with_images(loaded.denoiser, latents, 500, text, embeds)
        without = ip_adapter.predict_noise_with_images(loaded.denoiser, latents, 500, text, torch.zeros_like(embeds))
    assert (with_image - without).abs().max() > 1e-4, "the image embedding must change the prediction"


def test_image_embeddings_join_each_familys_call_and_the_unconditional_half_gets_a_zero_image():
    """Where a family takes image prompts (a UNet's added conditions, Flux's joint attention arguments) and which
    rows get the image: under batch guidance the unconditional half gets a zero image; guidance-distilled Flux
    guides through its embedding in one pass, so every row gets the image."""
    from types import SimpleNamespace

    from erasers.families import UNetAdapter
    from erasers.families.flux import FluxAdapter

    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, *args, **call):
            calls.append(call)
            return None

    image = torch.ones(1, 3)
    ip_adapter.WithImages(Recorder(), image, UNetAdapter(None), guided=True)(
        torch.zeros(2, 4, 2, 2), 10, encoder_hidden_states=None, added_cond_kwargs={"time_ids": 7})
    added = calls[-1]["added_cond_kwargs"]
    assert added["time_ids"] == 7 and added["image_embeds"][0].shape == (2, 1, 3)
    assert added["image_embeds"][0][0].abs().sum() == 0 and (added["image_embeds"][0][1] == 1).all()

    # (guidance embedded, the guided batch's rows, the rows with the image)
    for guidance_embeds, batch, rows_with_image in ((True, 1, [0]), (False, 2, [1])):
        flux = FluxAdapter(SimpleNamespace(denoiser=SimpleNamespace(config=SimpleNamespace(
            guidance_embeds=guidance_embeds))))
        assert flux.batch_guidance is not guidance_embeds
        with_images = ip_adapter.WithImages(Recorder(), image, flux, guided=flux.batch_guidance)
        with_images(hidden_states=torch.zeros(batch, 4, 4))
        embeds = calls[-1]["joint_attention_kwargs"]["ip_adapter_image_embeds"][0]
        assert embeds.shape == (batch, 1, 3)
        assert [row for row in range(batch) if (embeds[row] == 1).all()] == rows_with_image
        assert all(embeds[row].abs().sum() == 0 for row in range(batch) if row not in rows_with_image)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_coerasing_on_sdxl_and_flux_trains_outside_the_text_path_and_saves_a_loadable_edit(
        tiny_pipeline_dirs, tmp_path, family):
    """Both stages: on SDXL the image-conditioned steps give the UNet its pooled text and size ids beside the image
    embeddings; on Flux the image goes through the XLabs-layout adapter, the blur acts on the unpacked latent. The
    trained parameters are ESD-u's (noxattn) and the edit loads without the adapter."""
    source = str(tiny_pipeline_dirs[family])
    loaded = load_pipeline(source, device="cpu")
    before = {k: v.clone() for k, v in loaded.denoiser.state_dict().items()}
    options = {"text_iterations": 2, "image_iterations": 2, "ddim_steps": 4, "image_count": 2, "lr": 1e-3,
               **random_ip_adapter_options(loaded, tmp_path)}
    out = erase(source, "coerasing", ["a star"], tmp_path / "edit", options=options, device="cpu",
                resolution=16 if family == "flux" else None)
    meta = read_edit(out)
    assert meta["base_family"] == family and meta["components"] == [loaded.family.denoiser]
    edited = load_pipeline(source, device="cpu")
    apply_edits(edited, [out])
    assert getattr(edited.denoiser, "encoder_hid_proj", None) is None
    after = edited.denoiser.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and not any(edited.adapter.conditioning_path(k) for k in changed), changed


def test_a_missing_adapter_or_mismatched_refinement_clip_fails_before_any_training(tiny_pipeline_dirs, tmp_path,
                                                                                     monkeypatch):
    """The adapter and the refinement CLIP are first used after stage 1 (1000 steps by default): they are checked
    before it and before anything is written, with one line that says what to pass."""
    from erasers.methods import coerasing

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the IP-Adapter and refinement CLIP were checked")

    monkeypatch.setattr(coerasing, "TrainingLoop", no_training)
    source = str(tiny_pipeline_dirs["sd"])
    options = {"text_iterations": 1, "image_iterations": 1, "image_count": 1}
    with pytest.raises(UsageError, match="the IP-Adapter folder .*missing does not exist; pass --set ip_adapter="):
        erase(source, "coerasing", ["a star"], tmp_path / "a", device="cpu",
              options={**options, "ip_adapter": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="the IP-Adapter .*empty .*has no readable weight file.*--set ip_adapter="):
        erase(source, "coerasing", ["a star"], tmp_path / "a", device="cpu",
              options={**options, "ip_adapter": str(tmp_path / "empty")})
    adapter = random_ip_adapter_options(load_pipeline(source, device="cpu"), tmp_path / "ip")
    (tmp_path / "other-clip").mkdir()
    clip_text_config(projection_dim=IMAGE_DIM + 1).save_pretrained(tmp_path / "other-clip")
    with pytest.raises(UsageError, match=f"projects to {IMAGE_DIM + 1} dimensions, the IP-Adapter's image encoder "
                                         f"to {IMAGE_DIM}"):
        erase(source, "coerasing", ["a star"], tmp_path / "b", device="cpu",
              options={**options, **adapter, "refine_clip": str(tmp_path / "other-clip")})
    with pytest.raises(UsageError, match="could not load the CLIP text tower for the refinement"):
        erase(source, "coerasing", ["a star"], tmp_path / "c", device="cpu",
              options={**options, **adapter, "refine_clip": str(tmp_path / "nothing")})
    assert not any((tmp_path / name).exists() for name in ("a", "a.partial", "b", "b.partial", "c", "c.partial"))


def test_bad_image_folders_are_usage_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        build_config("coerasing", toy=True, overrides={"images": str(tmp_path / "empty")})
    with pytest.raises(UsageError, match="is not a folder"):
        image_files(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match="not a readable image"):
        read_images(image_files(str(broken)))
    code = main(["erase", "--model", "toy", "--method", "coerasing", "--concept", "arrow", "--images",
                 str(tmp_path / "empty"), "--out", str(tmp_path / "edit")])
    assert code == 2 and "holds no images" in capsys.readouterr().err
    assert not (tmp_path / "edit").exists()


@pytest.mark.slow
def test_coerasing_erases_the_arrow_under_text_and_images_and_keeps_other_objects(tmp_path):
    from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score

    classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)
    options = {"text_iterations": 150, "image_iterations": 100, "image_count": 30}
    out = erase("toy", "coerasing", ["arrow"], tmp_path / "edit", options=options, device="cpu")
    arrows = [sample_image("arrow", None, 500 + i)[0] for i in range(10)]

    def image_rate(loaded):
        ip_adapter.load_ip_adapter(loaded, IP_ADAPTER_DIR)
        generated = ip_adapter.generate_with_images(loaded, [""] * 10, ip_adapter.encode_images(loaded, arrows),
                                                    list(range(10)), progress=False)
        return np.mean([p == "arrow" for p in classifier.predict(generated)[0]])

    base = load_pipeline("toy", device="cpu")
    base_rate = image_rate(base)
    edited = load_pipeline("toy", device="cpu")
    apply_edits(edited, [out])
    records, _ = classify_answer_set(edited, classifier, AnswerSet(seeds=(188,)), progress=False)
    table = score(records, ["arrow"], "object")
    # Other objects far above chance (10%): this short run kept 37% with the shipped adapter (the method table's
    # full default 46-63% over two training seeds), styles 100%.
    assert table["UA"] >= 0.7 and table["IRA"] >= 0.3 and table["CRA"] >= 0.4, table
    edited_rate = image_rate(edited)
    assert edited_rate <= base_rate - 0.3, (base_rate, edited_rate)


def arrow_rate_under_images(loaded, classifier, images) -> float:
    """The share of generations the classifier takes for an arrow when each is conditioned (empty prompt) on one of
    `images` through the toy IP-Adapter."""
    ip_adapter.load_ip_adapter(loaded, IP_ADAPTER_DIR)
    generated = ip_adapter.generate_with_images(loaded, [""] * len(images), ip_adapter.encode_images(loaded, images),
                                                list(range(len(images))), progress=False)
    return float(np.mean([p == "arrow" for p in classifier.predict(generated)[0]]))


@pytest.mark.heavy  # about 45 s of one core (70 s wall on the loaded 2-core machine): the default-suite check
def test_quick_coerasing_erases_the_arrow_under_text_and_images_and_keeps_other_objects(tmp_path):
    """A shorter run than the slow test's (40 text and 40 image iterations, 8 concept images) on a smaller answer set:
    the arrow in every style, three unrelated objects in three styles, one seed; and 10 arrow images through the
    IP-Adapter. Fewer arrows under both conditionings; the unrelated objects are still drawn far above chance (10%)."""
    from benchmarks.toycanvas.world import STYLES
    from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score

    classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)
    pairs = [("arrow", s) for s in STYLES]
    pairs += [(o, s) for o in ("circle", "square", "moon") for s in ("Flat", "Stripes", "Dots")]
    answers = AnswerSet(seeds=(188,), pairs=pairs)
    arrows = [sample_image("arrow", None, 500 + i)[0] for i in range(10)]
    base = load_pipeline("toy", device="cpu")
    base_table = score(classify_answer_set(base, classifier, answers, progress=False)[0], ["arrow"], "object")
    base_rate = arrow_rate_under_images(base, classifier, arrows)
    options = {"text_iterations": 40, "image_iterations": 40, "image_count": 8}
    out = erase("toy", "coerasing", ["arrow"], tmp_path / "edit", options=options, device="cpu")
    edited = load_pipeline("toy", device="cpu")
    apply_edits(edited, [out])
    table = score(classify_answer_set(edited, classifier, answers, progress=False)[0], ["arrow"], "object")
    edited_rate = arrow_rate_under_images(edited, classifier, arrows)
    # Measured (2-core CPU): UA 0.0 -> 0.9, IRA 1.0 -> 0.44, CRA 1.0 -> 1.0, arrow rate under images 1.0 -> 0.2
    # (training seed 1: UA 0.9, IRA 0.56, rate 0.4).
    assert table["UA"] >= base_table["UA"] + 0.4, (base_table, table)
    assert table["IRA"] >= 0.3 and table["CRA"] >= 0.6, (base_table, table)
    assert edited_rate <= base_rate - 0.4, (base_rate, edited_rate)
