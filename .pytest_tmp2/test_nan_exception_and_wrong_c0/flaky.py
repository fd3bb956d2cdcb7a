
def nan_on_second(prompts, responses):
    return [float("nan") if "bad" in r else 1.0 for r in responses]
def raise_on_bad(prompts, responses):
    for r in responses:
        if "bad" in r:
            raise KeyError("no score for this one")
    return [1.0] * len(responses)
def too_few(prompts, responses):
    return [1.0]
