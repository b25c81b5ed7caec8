"""A merged ETHER checkpoint is a plain litgpt checkpoint: litgpt's converter takes it to transformers."""

import litgpt.config
import litgpt.model
import pytest
import torch
from conftest import export_to_hf

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")


def test_merged_checkpoint_exports_to_transformers_with_the_same_logits(finetune_out, tmp_path):
    final = finetune_out / "final"
    hf_dir = export_to_hf(final, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    lit_model = litgpt.model.GPT(litgpt.config.Config.from_file(final / "model_config.yaml")).eval()
    lit_model.load_state_dict(torch.load(final / "lit_model.pth", weights_only=True))

    idx = torch.randint(0, lit_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits, lit_logits = hf_model(idx).logits, lit_model(idx)
    torch.testing.assert_close(hf_logits, lit_logits, rtol=1e-4, atol=1e-4)
