"""From a dataset to a DPO model that chats: make_preference_data.py writes the preference file
(against the loopback judge, kit/loopback_judge.py), dpo_finetuning.py trains on it, and
chat.py answers with the DPO weights as the run answered its test set."""

import json

import torch
from helpers import random_model, run_in_process, run_script, save

import chat
import dpo_finetuning as dpo
from kit.loopback_judge import FakeJudge
from kit.saved_model import TEST_MODE_CONFIG

SFT = "Smalltestmodel-sft-standalone.pth"
OUT = "Smalltestmodel-sft-standalone-dpo.pth"
ENTRIES = 20  # split 17/2/1; test mode trains on the first 10 in one batch of 8


def test_a_made_preference_file_trains_and_the_dpo_model_chats(tmp_path, capsys,
                                                              instruction_data_path):
    data = json.loads(instruction_data_path.read_text())[:ENTRIES]
    (tmp_path / "data.json").write_text(json.dumps(data))
    judge = FakeJudge()
    try:
        made = run_script("make_preference_data.py", "--data_path", "data.json", "--url",
                          judge.url, "--workers", "2", cwd=tmp_path)
    finally:
        judge.close()
    assert made.returncode == 0, made.stderr
    preference_file = tmp_path / "data-preference.json"
    assert len(json.loads(preference_file.read_text())) == ENTRIES

    sft = save(random_model(TEST_MODE_CONFIG), tmp_path / SFT, TEST_MODE_CONFIG)
    code, out, err = run_in_process(dpo.main, [sft, "--test_mode", "--data_path",
                                               str(preference_file), "--output_dir",
                                               str(tmp_path / "out")], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert f"Number of entries: {ENTRIES}" in lines
    assert "   Training loss: 0.6931471824645996" in lines
    assert any(line.startswith("Ep 1 (Step 000000): Train loss ") for line in lines)
    policy = torch.load(tmp_path / "out" / OUT, weights_only=True)
    reference = torch.load(sft, weights_only=True)
    assert not all(torch.equal(policy[name], reference[name]) for name in reference)

    answers = json.loads((tmp_path / "out" / "instruction-data-with-response-dpo.json")
                         .read_text())
    assert len(answers) == 2 and all(e["chosen"] and e["rejected"] for e in answers)
    for entry in answers:
        flags = ["--prompt", entry["instruction"]] + (["--input", entry["input"]]
                                                      if entry["input"] else [])
        code, out, err = run_in_process(chat.main, [str(tmp_path / "out" / OUT), "--device",
                                                    "cpu", *flags, "--max_new_tokens", "20"],
                                        capsys)
        assert (code, err) == (0, "")
        assert entry["model_response"]
        assert out == entry["model_response"] + "\n"  # as the DPO run answered it
