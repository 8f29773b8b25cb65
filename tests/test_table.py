"""`llava-sculpt table`: Table 1 layout, arithmetic (checked by hand against the paper's own numbers),
best/second marks, the up-arrow gain and "-" for missing scores."""
import csv
import io
import json

import pytest

from llava_sculpt.errors import UserError
from llava_sculpt.eval import table

SOURCES = ("okvqa", "ocrvqa", "gqa", "textvqa")


def make_run(root, name, method, rank, target, sources, targets):
    run = root / name
    (run / "scores").mkdir(parents=True)
    (run / "run_meta.json").write_text(json.dumps({"method": method, "rank": rank, "target": target}))
    for task, value in list(zip(SOURCES, sources)) + list(targets.items()):
        if value is not None:
            (run / "scores" / f"{task}.json").write_text(json.dumps(
                {"task": task, "metric": "m", "score": value, "num_samples": 10, "compat": "official"}))
    return str(run)


@pytest.fixture
def runs(tmp_path):
    """Numbers from the paper's Table 1 (IconQA rank 16 and 32, COCO rank 16); DoRA r32 lacks GQA."""
    return [
        make_run(tmp_path, "zs", "zero-shot", None, None, (57.99, 66.20, 61.93, 58.23),
                 {"iconqa": 23.18, "coco": 40.40}),
        make_run(tmp_path, "sculpt16", "sculpt", 16, "iconqa", (54.07, 57.00, 57.66, 52.24), {"iconqa": 85.02}),
        make_run(tmp_path, "lora16", "lora", 16, "iconqa", (51.10, 54.90, 55.56, 49.48), {"iconqa": 84.14}),
        make_run(tmp_path, "orth16", "orth-reg", 16, "iconqa", (53.12, 56.10, 57.43, 51.00), {"iconqa": 84.52}),
        make_run(tmp_path, "sculpt32", "LoRASculpt", 32, "iconqa", (53.52, 59.50, 57.63, 53.76), {"iconqa": 85.26}),
        make_run(tmp_path, "dora32", "dora", 32, "iconqa", (46.35, 48.50, None, 33.01), {"iconqa": 84.82}),
        make_run(tmp_path, "lora32", "lora", 32, "iconqa", (45.06, 48.40, 49.22, 36.47), {"iconqa": 82.52}),
        make_run(tmp_path, "coco_lora16", "lora", 16, "coco", (47.34, 60.55, 56.91, 45.61), {"coco": 112.22}),
        make_run(tmp_path, "coco_sculpt16", "sculpt", 16, "coco", (50.86, 59.10, 57.64, 51.10), {"coco": 121.26}),
    ]


def md_rows(md):
    """{table title: [(method, [cells])]} from the markdown output."""
    tables, title = {}, None
    for line in md.splitlines():
        if line.startswith("### "):
            title = line[4:]
            tables[title] = []
        elif line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[title].append((cells[0], cells[1:]))
    return tables


def test_markdown_layout_and_arithmetic(runs, capsys):
    assert table.main(runs) == 0
    md = capsys.readouterr().out
    assert "| Method | OKVQA | OCRVQA | GQA | TextVQA | Source | Target | Avg |" in md
    tables = md_rows(md)
    assert list(tables) == ["Fine-tuned on IconQA", "Fine-tuned on COCO-Caption"]
    icon = tables["Fine-tuned on IconQA"]
    assert [m for m, _ in icon] == ["Zero-shot", "*LoRA Rank=16*", "LoRA", "Orth-Reg", "LoRASculpt",
                                    "*LoRA Rank=32*", "LoRA", "DoRA", "LoRASculpt"]
    rows = {(i, m): cells for i, (m, cells) in enumerate(icon)}
    # zero-shot: Source = (57.99+66.20+61.93+58.23)/4 = 61.0875, Avg = (61.0875+23.18)/2 = 42.13375; unmarked
    assert rows[(0, "Zero-shot")] == ["57.99", "66.20", "61.93", "58.23", "61.09", "23.18", "42.13"]
    # rank 16, by hand: LoRA Source 211.04/4 = 52.76, Avg (52.76+84.14)/2 = 68.45 (paper: 52.76 / 68.45)
    assert rows[(2, "LoRA")] == ["51.10", "54.90", "55.56", "49.48", "52.76", "84.14", "68.45"]
    # Orth-Reg: Source 217.65/4 = 54.4125, Avg 69.46625 -> second everywhere
    assert rows[(3, "Orth-Reg")] == ["<u>53.12</u>", "<u>56.10</u>", "<u>57.43</u>", "<u>51.00</u>",
                                     "<u>54.41</u>", "<u>84.52</u>", "<u>69.47</u>"]
    # LoRASculpt: Source 220.97/4 = 55.2425, Avg 70.13125; gain 70.13 - 69.47 = 0.66 (the paper's 70.13↑0.66)
    assert rows[(4, "LoRASculpt")] == ["**54.07**", "**57.00**", "**57.66**", "**52.24**", "**55.24**",
                                       "**85.02**", "**70.13**↑0.66"]
    # rank 32: DoRA lacks GQA -> "-" there and for Source/Avg; GQA second place goes to LoRA
    assert rows[(7, "DoRA")] == ["<u>46.35</u>", "<u>48.50</u>", "-", "33.01", "-", "<u>84.82</u>", "-"]
    # LoRA: Source 179.15/4 = 44.7875, Avg (44.7875+82.52)/2 = 63.65375
    assert rows[(6, "LoRA")] == ["45.06", "48.40", "<u>49.22</u>", "<u>36.47</u>", "<u>44.79</u>", "82.52",
                                 "<u>63.65</u>"]
    # LoRASculpt: Source 224.41/4 = 56.1025, Avg 70.68125; gain over LoRA (DoRA has no Avg) 70.68-63.65 = 7.03
    assert rows[(8, "LoRASculpt")][-1] == "**70.68**↑7.03"
    # COCO table: zero-shot Avg (61.0875+40.40)/2 = 50.74375 (paper 50.74); LoRASculpt Avg
    # ((50.86+59.10+57.64+51.10)/4 + 121.26)/2 = (54.675+121.26)/2 = 87.9675 (paper 87.97);
    # LoRA ((210.41/4) + 112.22)/2 = 82.41125; gain 87.97 - 82.41 = 5.56
    coco = tables["Fine-tuned on COCO-Caption"]
    assert coco[0] == ("Zero-shot", ["57.99", "66.20", "61.93", "58.23", "61.09", "40.40", "50.74"])
    assert coco[2][1][-2:] == ["<u>112.22</u>", "<u>82.41</u>"]
    assert coco[3][1][-2:] == ["**121.26**", "**87.97**↑5.56"]
    # OCRVQA in COCO: LoRA 60.55 beats LoRASculpt 59.10
    assert coco[2][1][1] == "**60.55**" and coco[3][1][1] == "<u>59.10</u>"


def test_csv_and_json_outputs(runs, tmp_path):
    prefix = tmp_path / "out" / "table1"
    assert table.main(runs + ["--format", "md,csv,json", "--out", str(prefix)]) == 0
    assert (tmp_path / "out" / "table1.md").read_text().startswith("### Fine-tuned on IconQA")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table1.csv").read_text())))
    assert [(r["target"], r["rank"], r["method"]) for r in rows][:4] == [
        ("iconqa", "", "Zero-shot"), ("iconqa", "16", "LoRA"), ("iconqa", "16", "Orth-Reg"),
        ("iconqa", "16", "LoRASculpt")]
    sculpt = rows[3]
    assert sculpt["Avg"] == "70.13" and sculpt["avg_gain"] == "0.66" and sculpt["second"] == ""
    assert sculpt["best"].split(";") == list(table.COLUMNS)
    assert rows[2]["second"].split(";") == list(table.COLUMNS)
    dora = next(r for r in rows if r["method"] == "DoRA")
    assert (dora["GQA"], dora["Source"], dora["Avg"], dora["avg_gain"]) == ("-", "-", "-", "")
    assert dora["best"] == "" and dora["second"] == "OKVQA;OCRVQA;Target"

    payload = json.loads((tmp_path / "out" / "table1.json").read_text())
    assert [t["target"] for t in payload["tables"]] == ["iconqa", "coco"]
    lora = payload["tables"][0]["rows"][1]
    assert lora["values"]["Source"] == pytest.approx(52.76, abs=1e-9)
    assert lora["values"]["Avg"] == pytest.approx((52.76 + 84.14) / 2, abs=1e-9)
    assert lora["best"] == [] and lora["second"] == []
    sculpt = payload["tables"][0]["rows"][3]
    assert sculpt["avg_gain"] == pytest.approx(0.66) and sculpt["display"]["Avg"] == "70.13↑0.66"
    dora = payload["tables"][0]["rows"][5]
    assert dora["values"]["GQA"] is None and dora["values"]["Source"] is None and dora["display"]["Avg"] == "-"


def _run(method, rank, scores, target="iconqa"):
    return table.Run(f"/runs/{method}{rank}", table.method_key(method), rank, target, dict(scores))


def test_ties_share_the_mark_and_suppress_the_arrow():
    full = dict(zip(SOURCES, (50.0, 50.0, 50.0, 50.0)))
    runs = [_run("lora", 8, {**full, "iconqa": 80.0}), _run("dare", 8, {**full, "iconqa": 80.004}),
            _run("sculpt", 8, {**full, "iconqa": 70.0})]
    (t,) = table.build_tables(runs)
    lora, dare, sculpt = t.rows  # no zero-shot run given
    # 80.0 and 80.004 both show as 80.00: both best, nobody second, no unique winner -> no arrow
    assert "Target" in lora.best and "Target" in dare.best and "Target" in sculpt.second
    assert lora.avg_gain is None and dare.avg_gain is None
    assert "OKVQA" in sculpt.best  # all equal -> all best
    assert table.cell_text(lora, "Avg") == "65.00"


def test_single_method_group_is_not_marked():
    (t,) = table.build_tables([_run("sculpt", 4, {**dict(zip(SOURCES, (1, 2, 3, 4))), "iconqa": 5.0})])
    assert t.rows[0].best == [] and t.rows[0].avg_gain is None
    assert t.rows[0].values["Source"] == 2.5 and t.rows[0].values["Avg"] == 3.75


def test_errors(tmp_path, runs):
    with pytest.raises(UserError, match="run_meta.json"):
        table.main([str(tmp_path)])
    twin = make_run(tmp_path, "lora16b", "LoRA", 16, "iconqa", (1, 2, 3, 4), {"iconqa": 5})
    with pytest.raises(UserError, match="two runs of method 'lora', rank 16"):
        table.main(runs + [twin])
    bad = make_run(tmp_path, "norank", "dare", None, "iconqa", (1, 2, 3, 4), {"iconqa": 5})
    with pytest.raises(UserError, match="needs an integer 'rank'"):
        table.main([bad])
    with pytest.raises(UserError, match="--format"):
        table.main(runs + ["--format", "md,xlsx"])
    wrong = make_run(tmp_path, "wrong", "dare", 16, "iconqa", (1, 2, 3, 4), {"iconqa": 5})
    (tmp_path / "wrong" / "scores" / "gqa.json").write_text(json.dumps({"task": "okvqa", "score": 1.0}))
    with pytest.raises(UserError, match="not 'gqa'"):
        table.main([wrong])
