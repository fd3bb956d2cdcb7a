
def count_a(prompts, responses, weight=1.0):
    return [weight * r.count("a") for r in responses]
