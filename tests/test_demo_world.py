"""The demo model's world and build tools, without the trained weights: the renderer, the checker
built on its masks, the tokenizer files, and one training step of each part (CI never trains)."""
import json

import numpy as np
import pytest
import torch

from renoise.demo import checks, model, scenes, train
from renoise.demo.scenes import COLOURS, SHAPES, random_scene, render, shape_masks


def test_scenes_are_deterministic_per_seed():
    for seed in (0, 1, 12345):
        a, b = random_scene(seed), random_scene(seed)
        assert a == b and a.caption == b.caption
        assert np.array_equal(render(a), render(b))
    assert len({random_scene(s).caption for s in range(50)}) > 40


def test_caption_names_every_shape_and_the_background():
    for seed in range(200):
        s = random_scene(seed)
        words = s.caption.split()
        assert s.caption.endswith("background")
        for shape in s.shapes:
            assert shape.kind in words and shape.colour in words and shape.size in words
            assert shape.colour not in s.background
        assert 1 <= len(s.shapes) <= 3


def test_render_paints_shapes_in_their_colours_over_the_background():
    for seed in range(30):
        s = random_scene(seed)
        img = render(s)
        assert img.shape == (3, scenes.SIZE, scenes.SIZE) and img.dtype == np.float32
        assert 0 <= img.min() and img.max() <= 1
        masks = shape_masks(s)
        for shape, m in zip(s.shapes, masks):
            inside = m > 0.99
            assert inside.sum() > 50
            colour = np.asarray(COLOURS[shape.colour], np.float32) / 255
            assert np.abs(img[:, inside] - colour[:, None]).max() < 1e-6
        background = masks.sum(0) == 0
        assert np.isin(checks.nearest_colours(img)[background],
                       [list(COLOURS).index(c) for c in s.background]).all()


def test_checker_reads_rendered_scenes_exactly():
    """On the renderer's own images the checker must be right every time; otherwise its verdict on
    generated images would mean nothing."""
    for i in range(120):
        s = random_scene(10_000 + i, max_shapes=1)
        verdict = checks.judge(render(s), s)
        assert verdict["colour_ok"] and verdict["shape_ok"], (s.caption, verdict)


def test_checker_tells_shapes_apart_under_noise():
    rng = np.random.default_rng(0)
    right = 0
    for i, kind in enumerate(SHAPES * 6):
        s = random_scene(20_000 + i, max_shapes=1).replace_shape(kind=kind)
        noisy = np.clip(render(s) + rng.normal(0, 0.05, (3, 128, 128)).astype(np.float32), 0, 1)
        right += checks.judge(noisy, s)["shape_ok"]
    assert right == len(SHAPES) * 6


def test_checker_rejects_a_wrong_colour_and_shape():
    s = random_scene(7, max_shapes=1)
    other_colour = next(c for c in COLOURS if c != s.shapes[0].colour and c not in s.background)
    other_kind = next(k for k in SHAPES if k != s.shapes[0].kind)
    wrong = render(s.replace_shape(colour=other_colour, kind=other_kind))
    verdict = checks.judge(wrong, s)
    assert not verdict["colour_ok"] and not verdict["shape_ok"]
    with pytest.raises(ValueError, match="one-shape"):
        checks.judge(wrong, scenes.Scene(s.shapes * 2, s.background))


def test_learned_merges_make_every_caption_word_one_token(tmp_path):
    from renoise.models.tokenizer import load_tokenizer
    tok = load_tokenizer(model.write_tokenizer(tmp_path / "tok"), subfolder=None)
    vocab, _ = model.vocabulary()
    for word in model.WORDS:
        assert tok.encode(word) == [vocab[word + "</w>"]]
    assert max(vocab.values()) == vocab["<|endoftext|>"]


def test_tokenizer_files_match_transformers(tmp_path):
    """Both formats (vocab.json + merges.txt, tokenizer.json) give transformers' ids and ours."""
    transformers = pytest.importorskip("transformers")
    from renoise.models.tokenizer import load_tokenizer
    folder = model.write_tokenizer(tmp_path / "tok")
    ours = load_tokenizer(folder, subfolder=None)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = [random_scene(s).caption for s in range(20)] + ["", "A Purple STAR, left!", "zebra 42 on a cloud"]
    want = theirs(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(texts), want)


def _tiny_run(tmp_path):
    torch.manual_seed(0)
    vae, vae_losses = train.train_vae(1, batch=2, crop=64, images=4, quiet=True)
    means, logvars = train.encode_pool(vae, range(4), batch=2, quiet=True)
    captions = [random_scene(s).caption for s in range(4)]
    unet, text, unet_losses = train.train_unet(means, logvars, captions, 1, scaling_factor=1.0, batch=2, quiet=True)
    return vae, unet, text, vae_losses, unet_losses


def test_one_training_step_of_each_part_runs_and_saves_a_loadable_folder(tmp_path):
    from renoise.models import load_pipeline
    vae, unet, text, vae_losses, unet_losses = _tiny_run(tmp_path)
    assert len(vae_losses) == 1 and np.isfinite(vae_losses[0]["loss"])
    assert len(unet_losses) == 1 and np.isfinite(unet_losses[0]["loss"])
    folder = model.write_folder(tmp_path / "demo", unet, vae, text)
    header = json.loads((folder / "unet" / "config.json").read_text())
    assert header["_class_name"] == "UNet2DConditionModel"
    pipe = load_pipeline(folder)
    assert pipe.kind == "sd" and pipe.unet.config == model.UNET
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        ours = getattr(pipe, name).state_dict()
        for k, v in module.state_dict().items():
            assert torch.equal(ours[k], v.half().float()), (name, k)
    captions = train.sample_grid(folder, tmp_path / "samples.png", n=4, steps=1)
    from PIL import Image
    assert len(captions) == 4 and Image.open(tmp_path / "samples.png").size == (4 * 256, 128)   # [target | sample] x 4


def test_training_step_changes_the_weights():
    torch.manual_seed(0)
    vae0 = train.AutoencoderKL(model.VAE)
    vae, _ = train.train_vae(1, batch=2, crop=64, images=4, quiet=True, seed=0)
    torch.manual_seed(0)
    assert any(not torch.equal(a, b) for a, b in zip(vae0.state_dict().values(), vae.state_dict().values()))


def test_missing_demo_weights_get_a_clear_error(tmp_path, monkeypatch):
    import renoise.demo
    from renoise.models import load_pipeline
    monkeypatch.setattr(renoise.demo, "MODEL_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="demo model's weights are missing"):
        load_pipeline("demo")
