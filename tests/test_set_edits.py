"""Edits on the off-distribution sets (issues 21 and 24): every built set but the photographs carries
an edit prompt, a mask and a target colour per image, and folder items with a `target_colour` are
judged like demo edits (`edit_success`); a colour the checker does not know is a reported problem."""
import json

import numpy as np
import pytest
from PIL import Image

from renoise.__main__ import main
from renoise.demo import COLOURS, held_out, render, shape_masks
from renoise.demo.checks import dominant_colour
from renoise.evaluation import data, sets

EDITED = ("other-renderer", "unknown-words", "degraded")


@pytest.mark.parametrize("name", EDITED)
def test_built_sets_carry_an_edit_and_a_mask_for_every_image(name, tmp_path):
    n = 6
    items = data.from_folder(sets.build(name, tmp_path, n=n))
    entries = sets.images(name, n)
    assert len(items) == n
    for i, ((ident, img, caption), it) in enumerate(zip(entries, items)):
        assert it.problem is None and (it.id, it.prompt) == (ident, caption)   # images and captions as before
        assert it.edit_prompt and it.edit_prompt != it.prompt and it.mask is not None
        assert it.target_colour in COLOURS and it.target_colour in it.edit_prompt.split()
        x, mask = data.load(it)
        np.testing.assert_allclose(((x[0] + 1) / 2).numpy(), img, atol=0.6 / 255)
        core = mask.numpy() > 0.99                               # the pixels the judge reads
        assert mask.shape == (128, 128) and core.sum() >= 5 and float((mask > 0.01).float().mean()) < 0.8
        source = dominant_colour(img, core)
        assert source != it.target_colour                        # the edit changes the shape's colour
        old, new = caption.split(), it.edit_prompt.split()
        if name == "other-renderer":                             # one word swapped: the shape's colour
            diff = [(a, b) for a, b in zip(old, new) if a != b]
            assert len(old) == len(new) and diff == [(source, it.target_colour)]
        elif name == "unknown-words":                            # its unknown words kept
            assert {w for w in old if w != (old[1] if i % 3 == 0 else None)} <= set(new)
        else:                                                    # the demo's own edit and mask
            scene = held_out(i, max_shapes=3)
            assert (it.edit_prompt, it.target_colour) == data.demo_edit(i, max_shapes=3)
            np.testing.assert_allclose(mask.numpy(), shape_masks(scene)[0], atol=0.6 / 255)
            assert dominant_colour(render(scene), core) == scene.shapes[0].colour


def test_photos_have_no_edits(tmp_path):
    items = data.from_folder(sets.build("photos", tmp_path, n=2))
    assert [(it.edit_prompt, it.mask, it.target_colour, it.problem) for it in items] == [(None, None, None, None)] * 2


def _folder(tmp_path, lines):
    """A folder with held-out scene 0 as image.png, its shape's mask and the given captions lines."""
    scene = held_out(0)
    Image.fromarray((render(scene).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)).save(tmp_path / "image.png")
    Image.fromarray((shape_masks(scene)[0] * 255 + 0.5).astype(np.uint8)).save(tmp_path / "mask.png")
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return scene


def test_target_colour_is_checked(tmp_path):
    base = {"image": "image.png", "prompt": "a square", "edit_prompt": "a green square", "mask": "mask.png"}
    _folder(tmp_path, [{**base, "id": "ok", "target_colour": "green"},
                       {**base, "id": "teal", "target_colour": "teal"},
                       {**base, "id": "number", "target_colour": 3},
                       {**{k: v for k, v in base.items() if k != "mask"}, "id": "no-mask", "target_colour": "red"},
                       {**{k: v for k, v in base.items() if k != "edit_prompt"}, "id": "no-edit",
                        "target_colour": "red"}])
    items = {it.id: it for it in data.from_folder(tmp_path)}
    assert items["ok"].problem is None and items["ok"].target_colour == "green"
    assert "'teal'" in items["teal"].problem and "not a colour the checker knows" in items["teal"].problem
    assert "green" in items["teal"].problem                       # it lists the colours it knows
    assert "'target_colour' must be a string" in items["number"].problem
    assert "needs a 'mask'" in items["no-mask"].problem and "needs an edit prompt" in items["no-edit"].problem
    red = data.from_folder(tmp_path, edit_prompt="x")            # --edit-prompt gives the edit it lacked
    assert {it.id: it.problem for it in red}["no-edit"] is None
    other = data.Item("ok", "a square", "a green square", items["ok"].path, items["ok"].mask, target_colour="red")
    assert data.fingerprint(other) != data.fingerprint(items["ok"])   # a new target redoes the pair


def test_eval_judges_folder_items_and_the_built_sets(tmp_path):
    """The demo model, 2 DDIM steps: a folder item with `target_colour` gets edit_success from the
    dominant colour of its edit inside the mask; a bad colour is a bad input; a built set's rows too."""
    scene = _folder(tmp_path, [{"image": "image.png", "id": "good", "prompt": held_out(0).caption,
                                "edit_prompt": held_out(0).replace_shape(0, colour="green").caption,
                                "mask": "mask.png", "target_colour": "green"},
                               {"image": "image.png", "id": "bad", "prompt": "x", "edit_prompt": "y",
                                "mask": "mask.png", "target_colour": "vermilion"}])
    out = tmp_path / "out"
    common = ["--steps", "2", "--methods", "plain", "--threads", "1", "--quiet", "--no-plots"]
    assert main(["eval", "--images", str(tmp_path), "--out", str(out), "--save-images", *common]) == 0
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    good = next(r for r in rows if r["image"] == "good")
    edit = np.asarray(Image.open(out / "images" / "plain" / "good_edit.png"), np.float32).transpose(2, 0, 1) / 255
    want = dominant_colour(edit, shape_masks(scene)[0] > 0.99)
    assert good["target_colour"] == "green" and good["edit_colour"] == want
    assert good["edit_success"] is (want == "green") and good["edit_background_psnr"] > 0
    s = json.loads((out / "summary.json").read_text())
    assert [(b["image"], "not a colour the checker knows" in b["error"]) for b in s["bad_inputs"]] == [("bad", True)]
    out = tmp_path / "set"
    assert main(["eval", "--set", "degraded", "--set-size", "1", "--out", str(out), *common]) == 0
    (row,) = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert isinstance(row["edit_success"], bool) and row["edit_background_psnr"] > 0
    assert row["target_colour"] == data.demo_edit(0, max_shapes=3)[1] and row["calls_edit"] == 2


def test_the_sets_colours_are_the_checkers():
    assert set(sets.PALETTE) == set(COLOURS)                     # every target colour can be judged
