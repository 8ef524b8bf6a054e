"""Special token ids that published checkpoints do not write into config.json, per architecture.

    ids = SPECIAL_IDS.get("LLaDA2MoeModelLM")   # {"mask": 156895, "eos": 156892}
    mask = first(hf.get("mask_token_id"), tokenizer_mask, architecture_id(hf, "mask"))

Several diffusion families leave the mask id out of config.json and only their generate()
default or README names it (other servers keep the same kind of table: SGLang's and LMDeploy's
dLLM configs). Loaders prefer config.json, then the tokenizer, then this table.
"""

from __future__ import annotations

SPECIAL_IDS: dict[str, dict[str, int]] = {
    # LLaDA2.0/2.1/2.2 (inclusionAI): generate(eos_id=156892, mask_id=156895)
    "LLaDA2MoeModelLM": {"mask": 156895, "eos": 156892},
    # LLaDA-MoE-7B-A1B: the Ling tokenizer of LLaDA2, mask <|mask|> 156895
    "LLaDAMoEModelLM": {"mask": 156895, "eos": 156892},
    # SDAR (JetAstra): <|MASK|> 151669 (tokenizer_config.json; <MASK> in added_tokens.json)
    "SDARForCausalLM": {"mask": 151669},
    "SDARMoeForCausalLM": {"mask": 151669},
}


def architecture_id(hf: dict, kind: str) -> int | None:
    """The table's `kind` ("mask", "eos") id for the first of config.json's architectures."""
    for arch in hf.get("architectures") or ():
        if kind in SPECIAL_IDS.get(arch, {}):
            return SPECIAL_IDS[arch][kind]
    return None
