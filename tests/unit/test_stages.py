"""R-4B's three stages before annealing, as the shipped recipes run them through `bimode anneal`, in miniature:
each trains what the paper's table says and leaves the rest bit-identical; stage 3 masks the empty think block."""

import pytest
import torch

from bimode.recipes import load_recipe
from bimode.train.anneal import AnnealConfig, build_trainer
from bimode.train.components import component_of
from bimode.train.tokenization import IGNORE_INDEX
from tests.unit.test_anneal import train_file  # noqa: F401  (fixture)

# LLaVA reads the tower's last hidden state: its post-layernorm and pooling head get no gradient in any stage
UNUSED = ("model.vision_tower.post_layernorm", "model.vision_tower.head")


def _stage(recipe, tmp_path, data, model):
    return build_trainer(load_recipe(
        AnnealConfig, recipe, model_path=str(model), train_files=[str(data)], output_dir=str(tmp_path / recipe),
        max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=1024, use_cpu=True,
        bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", dataloader_num_workers=0))


@pytest.mark.parametrize("recipe, trained", [("r4b_stage1_projector", {"projector"}),
                                             ("r4b_stage2_alignment", {"vision", "projector"}),
                                             ("r4b_stage3_joint", {"vision", "projector", "llm"})])
def test_each_stage_trains_its_components_and_leaves_the_rest_bit_identical(tmp_path, train_file, tiny_dir,  # noqa: F811
                                                                            recipe, trained):
    trainer = _stage(recipe, tmp_path, train_file, tiny_dir)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    for name, param in model.named_parameters():
        if name.startswith(UNUSED):
            continue
        assert (not torch.equal(before[name], param.detach())) == (component_of(name) in trained), name


def test_stage_3_masks_the_empty_think_block_of_every_response(tmp_path, train_file, tiny_dir, tiny_tokenizer):  # noqa: F811
    trainer = _stage("r4b_stage3_joint", tmp_path, train_file, tiny_dir)
    collator = trainer.data_collator
    assert {mode for _, mode in collator.pairs} == {"no_think"}  # every response gets the empty block
    block = tiny_tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    pack = trainer.train_dataset[0]["pack"]
    batch = collator([{"pack": pack}])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    starts = [i for i in range(len(ids)) if ids[i:i + len(block)] == block]
    assert len(starts) == len(pack)  # one block per row, and every token of it out of the loss
    assert all(labels[s + k] == IGNORE_INDEX for s in starts for k in range(len(block)))
    assert all(labels[s + len(block)] != IGNORE_INDEX for s in starts)  # the answer right after it is learned
