"""Classification: a head on the last token, fine-tuned end to end from a pretrained run on labelled JSONL built
here from two bundled sources (lines of the sonnets vs speeches of two plays), reaches >= 90% held-out accuracy;
`scalelm classify` predicts with it; bad data is one line."""

from __future__ import annotations

import json
import re

from helpers import metrics

from scalelm.cli import main
from scalelm.data.corpus import bundled_texts


def labelled_jsonl(path):
    """200 sonnet passages (3 lines) and 200 play speeches (a speaker line and 2 lines), as JSONL."""
    texts = dict(bundled_texts())
    lines = {name: [line for line in texts[name].splitlines() if line.strip()] for name in texts}
    sonnet = lines["sonnets_gut.txt"]
    sonnets = ["\n".join(sonnet[i:i + 3]) for i in range(30, 630, 3)]
    speaker = re.compile(r"^[A-Z][A-Za-z ]{1,20}\.$")
    plays = [
        "\n".join(play[i:i + 3])
        for name in ("hamlet_gut.txt", "macbeth_gut.txt")
        for play in [lines[name]]
        for i in [j for j in range(len(play) - 2) if speaker.match(play[j])][100:200]
    ]
    assert len(sonnets) == len(plays) == 200
    rows = [{"text": t, "label": "sonnet"} for t in sonnets] + [{"text": t, "label": "play"} for t in plays]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_classifier_reaches_90_percent_and_predicts(base_run, tmp_path, capsys):
    data = labelled_jsonl(tmp_path / "labelled.jsonl")
    run = tmp_path / "clf"
    assert main(["finetune-classify", "--init-from", str(base_run), "--data", str(data), "--out", str(run),
                 "--train.steps", "60", "--train.global_batch", "16", "--optim.name", "adamw", "--optim.lr", "1e-2",
                 "--optim.warmup_steps", "10", "--train.eval_every", "0", "--no-metrics.progress",
                 "--cpu.kernels", "false", "--train.dtype", "fp32"]) == 0
    accuracy = [r["val_accuracy"] for r in metrics(run) if "val_accuracy" in r][-1]
    assert accuracy >= 0.9
    assert f"accuracy {accuracy:.3f} on 80 held-out examples" in capsys.readouterr().out

    assert main(["classify", str(run), "--text", "Macb.\nIs this a dagger which I see before me,",
                 "--text", "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:"]) == 0
    predictions = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert predictions == ["play", "sonnet"]


def test_bad_labelled_data_is_one_line(base_run, tmp_path, capsys):
    cases = {
        "one class": '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n',
        "no 'label' field": '{"text": "a", "label": "x"}\n{"text": "b"}\n',
        "not JSON": '{"text": "a", "label": "x"}\nnot json\n',
    }
    for message, content in cases.items():
        data = tmp_path / "bad.jsonl"
        data.write_text(content)
        assert main(["finetune-classify", "--init-from", str(base_run), "--data", str(data),
                     "--out", str(tmp_path / "clf")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message.split()[-1] in err, err
    assert main(["finetune-classify", "--data", str(data), "--out", str(tmp_path / "clf")]) == 2
    assert "needs --init-from" in capsys.readouterr().err
