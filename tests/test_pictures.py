"""`interp-cache heatmap`: the stitched attention map over prefill + decode, evicted cells marked, budget map."""

from __future__ import annotations

import torch

from conftest import hooked
from interp_cache.cli import main
from interp_cache.compress import H2O, Quest, policy_names
from interp_cache.analysis.pictures import heatmap, unread_mask

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_heatmap_cli_writes_a_png_with_evicted_cells_marked(tmp_path, capsys):
    out = tmp_path / "h2o.png"
    code = main(["heatmap", "--model", "zoo:gpt2", "--prompt", "Hello there, how are you today", "--max-new-tokens",
                 "6", "--compress", "h2o:heavy=4,recent=4", "--layer", "1", "--head", "2", "--out", str(out)])
    assert code == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    printed = capsys.readouterr().out
    assert "positions" in printed and "layer 1: [8," in printed  # H2O keeps heavy + recent = 8 per head


def test_heatmap_marks_nothing_without_compression_and_unread_cells_with_quest_bloom(tmp_path):
    model = hooked("bloom")
    dense = heatmap(model, "The quick brown fox jumps over", 8, 1, 0, str(tmp_path / "dense.png"))
    assert dense.unread_cells == 0 and dense.kept_counts is None
    assert dense.tokens == len("The quick brown fox jumps over") + 7  # the last new token is never fed
    quest = heatmap(model, "The quick brown fox jumps over", 8, 1, 0, str(tmp_path / "quest.png"),
                    compress=Quest(budget=8, page_size=4, dense_layers=1))
    assert quest.unread_cells > 0
    h2o = heatmap(model, "The quick brown fox jumps over", 8, 1, 0, str(tmp_path / "h2o.png"),
                  compress=H2O(heavy=4, recent=4))
    assert h2o.kept_counts.tolist() == [[8] * h2o.kept_counts.shape[1]] * model.num_layers


def test_unread_mask_is_the_causally_allowed_nan_cells():
    pattern = torch.tensor([[1.0, float("nan"), float("nan")], [float("nan"), 1.0, float("nan")], [0.5, 0.0, 0.5]])
    assert unread_mask(pattern).tolist() == [[False, False, False], [True, False, False], [False, False, False]]


def test_heatmap_cli_rejects_bad_input_with_the_accepted_range(capsys):
    assert main(["heatmap", "--model", "zoo:gpt2", "--prompt", "Hi", "--layer", "5", "--out", "x.png"]) == 2
    assert "layer must be in [0, 2)" in capsys.readouterr().err
    assert main(["heatmap", "--model", "zoo:gpt2", "--prompt", "Hi", "--compress", "lru:budget=4", "--out", "x.png"]) == 2
    assert f"accepted: {', '.join(policy_names())}" in capsys.readouterr().err


def test_heatmap_cli_refuses_zero_new_tokens_and_a_missing_directory_before_any_work(tmp_path, capsys):
    missing = tmp_path / "missing_dir" / "x.png"
    assert main(["heatmap", "--model", "zoo:gpt2", "--prompt", "Hi", "--out", str(missing)]) == 2
    assert f"the directory {missing.parent} does not exist" in capsys.readouterr().err
    out = tmp_path / "x.png"
    assert main(["heatmap", "--model", "zoo:gpt2", "--prompt", "Hi", "--max-new-tokens", "0", "--out", str(out)]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err and not out.exists()


def test_attention_map_has_colour_bar_token_labels_boundary_and_readable_budget_text():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from interp_cache.analysis.pictures import draw_attention, draw_budgets

    pattern = torch.tensor([[1.0, float("nan"), float("nan")], [0.5, 0.5, float("nan")], [0.2, 0.3, 0.5]])
    figure, (left, right) = plt.subplots(1, 2)
    draw_attention(left, pattern, "t", prompt_length=2, token_labels=["a", "b", "c"])
    assert [label.get_text() for label in left.get_xticklabels()] == ["a", "b", "c"]
    assert any(line.get_ydata()[0] == 1.5 for line in left.lines)  # the prefill | decode boundary
    draw_budgets(right, torch.tensor([[2, 9], [9, 2]]), "b")
    assert len(figure.axes) == 4  # each map has its colour bar
    colours = {text.get_text(): text.get_color() for text in right.texts}
    assert colours == {"9": "black", "2": "white"}  # dark text on the light end of the map, light on the dark
    figure2, axis = plt.subplots()
    draw_attention(axis, torch.rand(60, 60).tril(), "long", prompt_length=50)
    figure2.canvas.draw()
    ticks = axis.get_xticks()
    assert all(float(t).is_integer() for t in ticks)
    plt.close("all")
