"""The LoRA + DGPO notebook runs end to end, offline, in a kernel of this environment."""

import pytest
from toolkit_fixtures import EXAMPLES

NOTEBOOK = EXAMPLES / "notebooks" / "lora_dgpo.ipynb"


def test_notebook_is_stored_without_outputs():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    text = "\n".join(cell.source for cell in notebook.cells)
    assert "peft_config=peft_config" in text and "DGPOTrainer" in text  # LoRA + DGPO, as the title says


@pytest.mark.slow
def test_notebook_executes_end_to_end(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this environment: same interpreter, offline, one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    outputs = {}
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"], index
            outputs[index] = cell.outputs
    text = "\n".join(
        o.get("text", "") if o.output_type == "stream" else str(o.get("data", {}).get("text/plain", ""))
        for cell_outputs in outputs.values()
        for o in cell_outputs
    )
    html = "\n".join(
        o.get("data", {}).get("text/html", "")
        for cell_outputs in outputs.values()
        for o in cell_outputs
        if "data" in o
    )
    assert "trainable params" in text  # the LoRA adapter is what trains
    assert "mean reward, first 10 steps" in text
    assert 'class="dgpo-token"' in html  # the token-weight heatmap was displayed
    assert 'class="dgpo-prompt">prompt <span class="dgpo-text" title="r' in html  # under its prompts
    assert '· expected <span class="dgpo-text">' in html  # and the answers they expect
    assert "| problems | Avg@8 | Cons@8 | Pass@8 |" in text
    assert (tmp_path / "outputs" / "notebook" / "token_weights.html").exists()
    assert (tmp_path / "outputs" / "notebook" / "lora-dgpo-merged" / "model.safetensors").exists()
