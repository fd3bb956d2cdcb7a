
import torch
def prompt_len(prompts, responses):
    return torch.tensor([float(len(p)) for p in prompts])
