"""Editing modes (renoise.editing) on the demo model: the source branch is the reconstruction, p2p
with the source prompt is the reconstruction, an all-ones blend is the swap, a user mask keeps the
source's latents outside it at every step; the token aligner; the CLI's editing flags."""
import json

import pytest
import torch

from renoise.editing import EditControl, align_tokens, changed_positions, latent_mask, word_positions

SOURCE = "a large yellow square in the center on a black background"
EDIT = "a large green square in the center on a black background"


@pytest.fixture(scope="module")
def setup():
    from renoise.demo import Scene, Shape, render_tensor
    from renoise.models import load_pipeline
    from renoise.pipeline import Editor
    pipe = load_pipeline("demo", dtype=torch.float32, device="cpu")
    editor = Editor(pipe, "demo-4")
    scene = Scene((Shape("square", "yellow", "large", "center"),), ("black",))
    x = render_tensor(scene)
    inv = editor.invert(x, SOURCE, generator=torch.Generator().manual_seed(0), sample_posterior=False)
    recon, _ = editor.reconstruct_latents(inv)
    swap, _ = editor.edit_latents(inv, EDIT)
    return editor, inv, recon, swap


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol


def test_align_tokens_word_swap_and_refinement():
    assert align_tokens([1, 2, 3, 4], [1, 5, 3, 4]) == [0, 1, 2, 3]          # same count: j -> j
    assert align_tokens([1, 2, 3, 9, 9], [1, 2, 7, 3, 9], 9) == [0, 1, -1, 2, 3]   # an inserted word (9: pad)
    assert align_tokens([1, 2, 7, 3, 9], [1, 2, 3, 9, 9], 9) == [0, 1, 3, 4, -1]   # a removed word
    assert align_tokens([1, 2, 3, 9, 9], [1, 5, 3, 9, 9], 9) == [0, 1, 2, 3, 4]    # a swapped word
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = torch.randint(0, 4, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        e = torch.randint(0, 4, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        a = align_tokens(s, e)
        pairs = [(i, j) for j, i in enumerate(a) if i >= 0]
        if len(s) != len(e):
            assert all(s[i] == e[j] for i, j in pairs)                          # matches are equal tokens
            assert [i for i, _ in pairs] == sorted({i for i, _ in pairs})        # in order, each source once


def test_changed_positions_and_word_positions(setup):
    tok = setup[0].pipe.tokenizer
    s, e = tok([SOURCE])[0].tolist(), tok([EDIT])[0].tolist()
    sp, ep = changed_positions(s, e, tok.pad_token_id)
    assert sp == ep == word_positions(tok, e, "green") == word_positions(tok, s, "yellow")
    longer = tok(["a large bright green square in the center on a black background"])[0].tolist()
    sp, ep = changed_positions(s, longer, tok.pad_token_id)
    assert [tok.encode("yellow")] == [[s[i] for i in sp]]
    assert [longer[j] for j in ep] == tok.encode("bright green")


def test_source_branch_is_the_reconstruction_and_plain_pair_is_the_swap(setup):
    editor, inv, recon, swap = setup
    out = editor.edit_pair(inv, EDIT)
    assert close(out.source, recon) and close(out.edit, swap)
    assert out.calls == inv.num_steps and out.mask is None


def test_p2p_with_the_source_prompt_returns_the_reconstruction(setup):
    editor, inv, recon, _ = setup
    for control in (EditControl(mode="p2p"), EditControl(mode="p2p", self_inject=0.5, reweight=(("yellow", 1.0),)),
                    EditControl(mode="p2p", self_inject=1.0, self_inject_kind="kv")):
        out = editor.edit_pair(inv, SOURCE, control)
        assert torch.equal(out.edit, out.source)
        assert close(out.edit, recon)


def test_p2p_changes_the_edit_and_reweighting_matters(setup):
    editor, inv, recon, swap = setup
    p2p = editor.edit_pair(inv, EDIT, EditControl(mode="p2p")).edit
    assert not close(p2p, swap, 1e-3) and not close(p2p, recon, 1e-3)
    zero = editor.edit_pair(inv, EDIT, EditControl(mode="p2p", reweight=(("green", 0.0),))).edit
    assert not close(zero, p2p, 1e-3)
    with pytest.raises(ValueError, match="not in the edit prompt"):
        editor.edit_pair(inv, EDIT, EditControl(mode="p2p", reweight=(("purple", 2.0),)))


def test_local_blend_with_an_all_ones_mask_equals_swap(setup):
    editor, inv, _, swap = setup
    out = editor.edit_pair(inv, EDIT, EditControl(local_blend=("auto",), blend_threshold=0.0, blend_start=0.0))
    assert bool((out.mask == 1).all())
    assert close(out.edit, swap)
    ones = editor.edit_pair(inv, EDIT, EditControl(mask=torch.ones(*inv.size)))
    assert close(ones.edit, swap)


def test_user_mask_keeps_source_latents_outside_at_every_step(setup):
    editor, inv, _, _ = setup
    H, W = inv.size
    mask = torch.zeros(H, W)
    mask[40:88, 40:88] = 1
    inside = latent_mask(mask, 1)[0, 0].bool()
    assert inside.sum() == 36                                            # 48 px = 6 latent cells a side
    steps = []
    out = editor.edit_pair(inv, EDIT, EditControl(mode="p2p", mask=mask, local_blend=("green",)),
                           callback=lambda i, t, xe, xs: steps.append((xe.clone(), xs.clone())))
    assert len(steps) == inv.num_steps
    for xe, xs in steps:
        assert torch.equal(xe[..., ~inside], xs[..., ~inside])
    assert not close(out.edit[..., inside], out.source[..., inside], 1e-3)
    assert bool((out.mask[0, 0][~inside] == 0).all())


def test_controls_refused_with_reasons(setup):
    editor, inv, _, _ = setup
    with pytest.raises(ValueError, match="unknown edit mode"):
        EditControl(mode="p3p")
    with pytest.raises(ValueError, match="cross_replace"):
        EditControl(cross_replace=1.5)
    with pytest.raises(ValueError, match="neither"):
        editor.edit_pair(inv, EDIT, EditControl(local_blend=("circle",)))
    with pytest.raises(ValueError, match="no changed word"):
        editor.edit_pair(inv, SOURCE, EditControl(local_blend=("auto",)))
    with pytest.raises(ValueError, match="mask must be"):
        editor.edit_pair(inv, EDIT, EditControl(mask=torch.ones(2, 3, 128, 128)))
    import copy
    compiled = copy.copy(editor)
    compiled.compile = "compile"                    # a control is refused under compile=, not recompiled per step
    with pytest.raises(ValueError, match="run eagerly"):
        compiled.edit_pair(inv, EDIT, EditControl(mode="p2p"))


def test_cli_edit_modes_write_pictures_and_report(tmp_path):
    from renoise.__main__ import main
    from renoise.demo import Scene, Shape, render
    from renoise.images import save_image, to_pil
    scene = Scene((Shape("circle", "blue", "large", "left"),), ("white",))
    img = torch.from_numpy(render(scene))[None] * 2 - 1
    save_image(to_pil(img)[0], tmp_path / "scene.png")
    m = torch.zeros(1, 3, 128, 128) - 1
    m[..., :, :64] = 1
    save_image(to_pil(m)[0], tmp_path / "mask.png")
    out = tmp_path / "out"
    rc = main(["edit", "--image", str(tmp_path / "scene.png"), "--prompt", "a large blue circle on the left on a "
               "white background", "--edit-prompt", "a large red circle on the left on a white background",
               "--preset", "demo-4", "--mode", "p2p", "--cross-replace", "0.5", "--self-inject", "0.25",
               "--reweight", "red=1.5", "--local-blend", "auto", "--mask", str(tmp_path / "mask.png"),
               "--save-attention", "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    names = {"scene_edit.png", "scene_blend_mask.png", "scene_attention_source.png", "scene_attention_edit.png"}
    assert names <= set(report["outputs"]) and all((out / n).is_file() for n in names)
    assert report["settings"]["edit_mode"] == "p2p"
    assert report["settings"]["edit_control"]["reweight"] == [["red", 1.5]]
    assert report["model_calls"]["edit"] == 4
    from PIL import Image
    blend = torch.tensor(list(Image.open(out / "scene_blend_mask.png").getdata())).reshape(128, 128).float()
    assert blend[:, 64:].max() == 0                                      # nothing right of the user mask
    rc = main(["edit", "--image", str(tmp_path / "scene.png"), "--edit-prompt", "x", "--reweight", "red",
               "--device", "cpu", "--quiet", "--out", str(tmp_path / "bad")])
    assert rc == 2


def test_eval_edit_modes_rows_and_blend_mask_pictures(tmp_path):
    from renoise.__main__ import main
    out = tmp_path / "ev"
    rc = main(["eval", "--demo", "1", "--methods", "demo-4", "--preset", "demo-4", "--edit-mode", "p2p", "--local-blend", "auto",
               "--mask-edits", "--device", "cpu", "--quiet", "--grid", "1", "--no-plots", "--save-images",
               "--out", str(out)])
    assert rc == 0
    row = json.loads((out / "rows.jsonl").read_text().splitlines()[0])
    assert row["status"] == "ok" and row["edit_mode"] == "p2p" and row["calls_edit"] == 4
    assert 0 < row["blend_fraction"] < 1
    assert (out / "images" / "demo-4" / "demo-00000_blend_mask.png").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["edit_control"]["mode"] == "p2p" and run["edit_control"]["mask_edits"]


def test_paste_back_keeps_the_input_outside_the_mask():
    from renoise.editing import paste_back
    g = torch.Generator().manual_seed(0)
    edited, images = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1, torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    pixel = torch.zeros(32, 48)
    pixel[8:20, 16:40] = 1
    out = paste_back(edited, images, pixel)
    assert torch.equal(out[..., pixel == 0], images[..., pixel == 0])
    assert torch.equal(out[..., pixel == 1], edited[..., pixel == 1])
    latent = torch.zeros(2, 1, 4, 6)                     # latent cells drawn as 8x8 blocks, one mask per image
    latent[0, 0, 1, 2] = 1
    out = paste_back(edited, images, latent)
    assert torch.equal(out[0, :, 8:16, 16:24], edited[0, :, 8:16, 16:24]) and torch.equal(out[1], images[1])
    assert torch.equal(out[0, :, :8], images[0, :, :8])
    soft = paste_back(edited, images, pixel, feather=2)  # 1 on the mask, a ramp within 4 px, then the input
    assert torch.equal(soft[..., pixel == 1], edited[..., pixel == 1])
    far = torch.ones(32, 48, dtype=torch.bool)
    far[4:24, 12:44] = False
    assert torch.equal(soft[..., far], images[..., far])
    ramp = soft[..., 8:20, 41] - images[..., 8:20, 41]   # 2 px right of the mask: blended, neither end
    assert ramp.abs().max() > 0 and (ramp.abs() < (edited - images)[..., 8:20, 41].abs() + 1e-6).all()
    with pytest.raises(ValueError, match="fits neither"):
        paste_back(edited, images, torch.ones(30, 48))
    with pytest.raises(ValueError, match="one shape"):
        paste_back(edited, images[:1], pixel)
    with pytest.raises(ValueError, match="feather"):
        paste_back(edited, images, pixel, feather=-1)


def test_editor_paste_back_returns_the_input_outside_the_user_mask(setup):
    editor, inv, _, _ = setup
    from renoise.demo import Scene, Shape, render_tensor
    x = render_tensor(Scene((Shape("square", "yellow", "large", "center"),), ("black",)))
    mask = torch.zeros(*inv.size)
    mask[40:88, 40:88] = 1
    plain = editor.edit(inv, EDIT, control=EditControl(mask=mask))
    kept = editor.edit(inv, EDIT, control=EditControl(mask=mask), paste_back=x)
    outside = mask == 0
    assert torch.equal(kept[..., outside], x[..., outside])
    assert torch.equal(kept[..., ~outside], plain[..., ~outside])
    assert (plain[..., outside] - x[..., outside]).abs().max() > 1e-3     # the VAE's decoding is not the input
    blend = editor.edit(inv, EDIT, control=EditControl(local_blend=("auto",), blend_threshold=0.7), paste_back=x)
    out = editor.edit_pair(inv, EDIT, EditControl(local_blend=("auto",), blend_threshold=0.7))
    cells = torch.nn.functional.interpolate(out.mask, size=inv.size)[0, 0] == 0
    assert 0 < cells.float().mean() < 1 and torch.equal(blend[..., cells], x[..., cells])
    with pytest.raises(ValueError, match="has none"):
        editor.edit(inv, EDIT, paste_back=x)
    with pytest.raises(ValueError, match="has none"):
        editor.edit(inv, EDIT, control=EditControl(mode="p2p"), paste_back=x)


def test_cli_paste_back(tmp_path, capsys):
    from PIL import Image
    from renoise.__main__ import main
    from renoise.demo import Scene, Shape, render
    from renoise.images import save_image, to_pil
    scene = Scene((Shape("circle", "blue", "large", "left"),), ("white",))
    save_image(to_pil(torch.from_numpy(render(scene))[None] * 2 - 1)[0], tmp_path / "scene.png")
    m = torch.zeros(1, 3, 128, 128) - 1
    m[..., 16:80, 8:72] = 1
    save_image(to_pil(m)[0], tmp_path / "mask.png")
    common = ["--image", str(tmp_path / "scene.png"), "--prompt", "a large blue circle on the left on a white "
              "background", "--edit-prompt", "a large red circle on the left on a white background", "--preset",
              "demo-4", "--device", "cpu", "--quiet"]
    out = tmp_path / "out"
    assert main(["edit", *common, "--mask", str(tmp_path / "mask.png"), "--paste-back", "--out", str(out)]) == 0
    pixels = lambda p: torch.tensor(list(Image.open(p).convert("RGB").getdata())).reshape(128, 128, 3)
    src, edit = pixels(tmp_path / "scene.png"), pixels(out / "scene_edit.png")
    inside = torch.zeros(128, 128, dtype=torch.bool)
    inside[16:80, 8:72] = True
    assert torch.equal(edit[~inside], src[~inside]) and not torch.equal(edit[inside], src[inside])
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["paste_back"] is True and report["settings"]["feather"] == 0
    for flags, why in ((["--paste-back"], "add --mask FILE or --local-blend"),
                       (["--feather", "2", "--mask", str(tmp_path / "mask.png")], "add --paste-back"),
                       (["--paste-back", "--feather", "-1", "--mask", str(tmp_path / "mask.png")], "pixels >= 0")):
        rc = main(["edit", *common, *flags, "--out", str(tmp_path / "bad")])
        assert rc == 2 and why in capsys.readouterr().err, flags
    rc = main(["edit", "--inversion", str(out / "inversion.safetensors"), "--edit-prompt", "a large red circle on the "
               "left on a white background", "--mask", str(tmp_path / "mask.png"), "--paste-back", "--device", "cpu",
               "--quiet", "--out", str(tmp_path / "bad")])
    assert rc == 2 and "add --image" in capsys.readouterr().err


def test_eval_paste_back_rows(tmp_path):
    from renoise.__main__ import main
    out = tmp_path / "ev"
    assert main(["eval", "--demo", "1", "--methods", "demo-4", "--preset", "demo-4", "--mask-edits", "--paste-back",
                 "--device", "cpu", "--quiet", "--no-plots", "--out", str(out)]) == 0
    row = json.loads((out / "rows.jsonl").read_text().splitlines()[0])
    assert row["status"] == "ok" and row["edit_background_psnr"] >= 119.9         # the input's pixels (capped)
    assert row["edit_background_psnr_decoded"] < 60
    assert json.loads((out / "run.json").read_text())["edit_control"]["paste_back"] is True
    assert main(["eval", "--demo", "1", "--methods", "demo-4", "--paste-back", "--device", "cpu", "--quiet",
                 "--no-plots", "--out", str(tmp_path / "bad")]) == 2
