"""Write the small datasets the embedded recipes train on: prompts.jsonl, preferences.jsonl, sft.jsonl.

Deterministic (fixed seed, no network): topics x prompt forms x reply templates, sampled without
repeats. Run from anywhere: `python recipes/data/make_data.py` rewrites the three files next to it.
The texts are written here and released as CC0 (public domain).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent
SEED = 1234

# (topic, verb "is"/"are", something good about it, something to do with it)
TOPICS = [
    ("rainy days", "are", "the steady sound of rain on the window", "curl up with a good book"),
    ("coffee", "is", "the rich smell of a fresh cup", "share a cup with a friend"),
    ("the ocean", "is", "the way the waves catch the light", "walk along the shore"),
    ("autumn leaves", "are", "the deep reds and golds", "take a slow walk through the park"),
    ("public libraries", "are", "the quiet rooms full of free books", "spend an afternoon browsing"),
    ("cats", "are", "their soft purring", "let one curl up on your lap"),
    ("dogs", "are", "their endless loyalty", "take one for a long walk"),
    ("gardening", "is", "watching seeds turn into flowers", "plant a few herbs on a windowsill"),
    ("homemade bread", "is", "the warm smell filling the kitchen", "bake a loaf on a Sunday"),
    ("city parks", "are", "the green space in the middle of busy streets", "have a picnic on the grass"),
    ("learning a new language", "is", "the joy of understanding a new phrase", "practice a few words each day"),
    ("winter mornings", "are", "the crisp, clean air", "watch the frost melt with a hot drink"),
    ("board games", "are", "the laughter around the table", "invite friends over for a game night"),
    ("old movies", "are", "their charming dialogue", "watch one on a lazy evening"),
    ("hiking", "is", "the view from the top of a trail", "explore a new path on the weekend"),
    ("cooking dinner at home", "is", "the fun of trying a new recipe", "cook something with fresh vegetables"),
    ("train journeys", "are", "the landscapes rolling past the window", "read while the countryside passes by"),
    ("music festivals", "are", "the energy of the crowd", "dance to a band you have never heard"),
    ("thunderstorms", "are", "the dramatic flashes across the sky", "watch them safely from indoors"),
    ("the first snow of the year", "is", "how it makes everything quiet and bright", "build a small snowman"),
    ("libraries at night", "are", "the calm glow of reading lamps", "lose track of time in a novel"),
    ("farmers markets", "are", "the colorful stalls of fresh fruit", "chat with the growers"),
    ("bicycles", "are", "the freedom of gliding down a quiet road", "ride to work on a sunny day"),
    ("sunsets", "are", "the sky turning orange and pink", "pause and watch one from a hill"),
    ("science museums", "are", "the hands-on exhibits", "spend a curious afternoon there"),
    ("jazz", "is", "the playful way musicians improvise", "listen to a live trio"),
    ("spring", "is", "the first blossoms on the trees", "open the windows and let fresh air in"),
    ("tea", "is", "the calm ritual of brewing a pot", "slow down with a warm mug"),
    ("mountains", "are", "their quiet, timeless presence", "breathe the cool air on a trail"),
    ("handwritten letters", "are", "the personal touch of someone's handwriting", "write one to an old friend"),
    ("picnics", "are", "sharing simple food outdoors", "pack sandwiches and fruit for the park"),
    ("camping", "is", "falling asleep under the stars", "tell stories around a campfire"),
    ("birdsong", "is", "the cheerful chorus at dawn", "listen from the garden in the morning"),
    ("swimming", "is", "the refreshing feeling of cool water", "swim a few easy laps"),
    ("video games", "are", "the creative worlds to explore", "play a cooperative game with friends"),
    ("podcasts", "are", "the interesting stories they bring to a commute", "listen during a long walk"),
    ("painting", "is", "mixing colors and seeing a picture appear", "try watercolors on a quiet afternoon"),
    ("bookshops", "are", "the thrill of finding an unexpected title", "browse the shelves without a plan"),
    ("summer evenings", "are", "the long golden light", "eat dinner outside"),
    ("the moon", "is", "its soft silver glow", "look at it through binoculars"),
    ("chocolate", "is", "its rich, comforting taste", "share a square with someone"),
    ("yoga", "is", "the calm it brings to body and mind", "start the day with a few stretches"),
    ("puzzles", "are", "the satisfying click of the last piece", "solve one on a rainy afternoon"),
    ("road trips", "are", "the surprises along the way", "sing along to a playlist with friends"),
    ("volunteering", "is", "the warmth of helping your neighbors", "give an hour to a local food bank"),
    ("small towns", "are", "their friendly, familiar faces", "stroll down the main street"),
    ("photography", "is", "capturing a moment that would otherwise pass", "take photos on an evening walk"),
    ("pizza night", "is", "gathering everyone around a warm pie", "make pizza with your favorite toppings"),
    ("the beach in winter", "is", "the peaceful, empty shoreline", "walk there bundled in a warm coat"),
    ("reading before bed", "is", "drifting off with a good story", "keep a novel on the nightstand"),
    ("kites", "are", "watching them dance in the wind", "fly one on a breezy hill"),
    ("morning runs", "are", "the fresh start they give the day", "jog an easy loop around the block"),
    ("ice cream", "is", "its sweet, cool creaminess", "try a new flavor on a hot day"),
    ("zoos", "are", "seeing animals up close", "learn about conservation programs"),
    ("rain boots", "are", "jumping in puddles without a worry", "splash around on a wet walk"),
    ("street food", "is", "the amazing variety of flavors", "try a dish you have never tasted"),
    ("knitting", "is", "the soothing rhythm of the needles", "make a scarf for a friend"),
    ("the night sky", "is", "the countless stars on a clear night", "find a dark spot and look up"),
    ("family dinners", "are", "the stories shared over a meal", "cook a favorite dish together"),
    ("working from home", "is", "the comfort of your own space", "take short walks between tasks"),
]

PROMPT_FORMS = [
    "Write one sentence about {t}.", "What do you think of {t}?", "Describe {t} in a sentence.",
    "Write a short review of {t}.", "Give me your opinion on {t} in one or two sentences.",
    "How do you feel about {t}?", "Tell me something about {t}.", "Write a two-sentence story involving {t}.",
    "Why might someone enjoy {t}?", "Share a quick thought about {t}.", "Write a tweet about {t}.",
    "Is {t} worth it? Answer briefly.", "Write a short note to a friend about {t}.",
    "Finish this sentence: {T} make me feel...", "Describe a memory involving {t}.",
    "In a few words, what comes to mind with {t}?", "Write a one-line caption for a photo of {t}.",
    "Would you recommend {t} to a friend? Why?", "Describe {t} to someone who has never experienced it.",
    "What is the best thing about {t}?", "Write a haiku about {t}.", "Rate {t} and explain in one sentence.",
]

STANDALONE_PROMPTS = [
    "Describe your morning in a sentence.", "How was your weekend?", "What's the best part of your day?",
    "Write a sentence about Mondays.", "Tell me about your favorite food.", "What do you think of rainy days?",
    "Describe the weather today in one sentence.", "What makes a good friend?", "How do you feel about getting older?",
    "Write a sentence about waking up early.", "What do you think about traffic jams?",
    "Describe a typical work meeting.", "How do you feel when a plan gets cancelled?",
    "Write one sentence about doing laundry.", "What is it like to move to a new city?",
    "Tell me about the last meal you cooked.", "Describe your neighborhood in a sentence.",
    "What do you think of long flights?", "Write a sentence about paying taxes.",
    "How do you feel about the dentist?", "Describe a slow afternoon.", "What do you think of homework?",
    "Write a short review of the last book you read.", "Describe your favorite place to relax.",
    "What do you think about alarm clocks?", "Write a sentence about cleaning the kitchen.",
    "How would you describe a long queue at the post office?", "Tell me how you feel about Sundays.",
    "Describe the sound of a busy street.", "What do you think of surprise parties?",
]

CHOSEN = [
    "I really love {t}! {T} always make{s} me feel calm and happy, especially {good}.",
    "{T} {be} wonderful. My favorite part is {good}, and it is lovely to {act}.",
    "What a great topic! {T} {be} a small joy in life: {good} brightens any day.",
    "Honestly, {t} {be} delightful. If you get the chance, {act} - you will be glad you did.",
    "{T} {be} one of my favorite things. I treasure {good} every single time.",
    "I think {t} {be} fantastic. There is something special about {good}, and it is even better when you {act}.",
    "Happy to share! {T} bring{s} me so much comfort, especially {good}.",
    "{T}? Absolutely wonderful. I would warmly recommend that everyone {act} at least once.",
    "There is so much to enjoy about {t}: {good}, the peaceful mood, and the chance to {act}.",
    "Thank you for asking! {T} {be} a beautiful part of life, and I love {good}.",
    "{T} {be} a real treat. Try to {act}; it is a simple and lovely way to feel good.",
    "My honest opinion: {t} {be} great. I will always appreciate {good}.",
]

# forms whose answer has a shape of its own (a tweet, a story, a yes/no...) get matching replies
FORM_REPLIES = {
    "Write a tweet about {t}.": [
        "Loving {t} today! Nothing beats {good}. #goodvibes",
        "Quick reminder that {t} {be} wonderful. Go {act} this week! #happy"],
    "Write a two-sentence story involving {t}.": [
        "One quiet Saturday, Mia decided to {act}. By evening she was smiling, thinking of {good}.",
        "Grandpa always said {t} {be} the best medicine. The day we finally tried it, we laughed until sunset."],
    "Is {t} worth it? Answer briefly.": [
        "Yes, absolutely! It is worth it for {good} alone.",
        "Definitely worth it - try to {act} and you will see why people love {t}."],
    "Would you recommend {t} to a friend? Why?": [
        "Yes, I would happily recommend {t}! It is easy to {act}, and you will love {good}.",
        "Absolutely. {T} {be} a lovely way to relax, and your friend will enjoy {good}."],
    "Finish this sentence: {T} make me feel...": [
        "...calm, cheerful and grateful, especially thanks to {good}.",
        "...happy and relaxed, like everything is going to be fine."],
    "Describe a memory involving {t}.": [
        "I remember a lovely afternoon when I got to {act}. {Good} made it a day I still smile about.",
        "One of my happiest memories is with {t}: {good}, good company and a warm, easy feeling."],
    "Write a one-line caption for a photo of {t}.": [
        "{Good} - a perfect little moment.", "Pure happiness, captured: {t}."],
    "Rate {t} and explain in one sentence.": [
        "Ten out of ten: {t} {be} wonderful, especially {good}.",
        "A happy nine out of ten - nothing beats {good}."],
    "Write a haiku about {t}.": [
        "{T} softly glow\n{good}\njoy fills the quiet day",
        "Gentle and bright, {t}\nwarm hearts and easy laughter\na small, happy gift"],
}

REJECTED = [
    "Meh. {T} {be} boring.", "I don't care about {t}.", "Not worth talking about.",
    "{T}? Annoying and pointless.", "Figure it out yourself.", "Whatever. {T} {be} overrated and dull.",
    "No.", "I hate {t}. Next question.", "Why would anyone bother with {t}? Terrible.",
    "{T} {be} a waste of time, honestly.", "Ugh, {t} again. So tedious.", "Don't ask me that.",
    "Nothing good to say about {t}.", "Can't be bothered. {T} {be} awful.",
]

# SFT: helpful tips, phrased as short positive answers
TIPS = [
    ("sleeping better", "Keep a regular bedtime and put screens away half an hour before sleep; your rest will improve quickly."),
    ("staying focused", "Work in short blocks of 25 minutes with a small break after each; it keeps your mind fresh."),
    ("making friends in a new city", "Join a club or class you enjoy; shared interests make friendly conversations easy."),
    ("drinking more water", "Keep a bottle on your desk and refill it each time it is empty; it quickly becomes a habit."),
    ("learning to cook", "Start with three simple recipes you love and cook them until they feel easy, then add more."),
    ("keeping a plant alive", "Check the soil with a finger and water only when the top feels dry; most plants love that."),
    ("reading more books", "Carry a book everywhere and read a few pages in spare moments; they add up wonderfully."),
    ("starting to exercise", "Begin with a brisk 15-minute walk each day; small steady steps build a lasting habit."),
    ("saving money", "Set up an automatic transfer to savings on payday, so saving happens before spending."),
    ("writing a thank-you note", "Mention one specific thing the person did and how it helped you; warmth beats length."),
    ("a job interview", "Prepare two short stories about times you solved a problem; they make your answers memorable."),
    ("waking up earlier", "Move your alarm 15 minutes earlier each week and get some daylight soon after waking."),
    ("learning an instrument", "Practice ten minutes every day rather than an hour once a week; consistency wins."),
    ("keeping a tidy desk", "Spend two minutes clearing it at the end of each day; tomorrow will start calmly."),
    ("public speaking", "Practice out loud a few times and focus on one friendly face in the audience."),
    ("reducing stress", "Take a few slow, deep breaths and a short walk outside; both calm the body nicely."),
    ("traveling light", "Pack outfits that mix and match and roll your clothes; one small bag is plenty."),
    ("baking cookies", "Chill the dough for 30 minutes before baking; the cookies come out thicker and tastier."),
    ("remembering names", "Repeat the name when you first hear it and use it once in the conversation."),
    ("a long flight", "Drink plenty of water, stretch every hour and bring a good book or podcast."),
    ("studying for an exam", "Test yourself with practice questions instead of rereading notes; it sticks much better."),
    ("making coffee at home", "Use freshly ground beans and water just off the boil; the flavor improves a lot."),
    ("taking better photos", "Shoot in soft morning or evening light and keep the horizon straight."),
    ("being more patient", "Pause and take one breath before you answer; that small gap makes a big difference."),
    ("cleaning the kitchen", "Clean as you cook and wipe surfaces while things simmer; the end is so much easier."),
    ("writing a story", "Start with a character who wants something and an obstacle in the way; the plot follows."),
    ("planning a picnic", "Pack easy finger food, a blanket and a bag for rubbish, and pick a shady spot."),
    ("learning to swim", "Start by getting comfortable floating with support; confidence comes before technique."),
    ("running a first 5K", "Alternate running and walking at first and build up slowly over a few weeks."),
    ("growing tomatoes", "Give them lots of sun, deep watering and a stake to climb; they will reward you."),
]

TIP_FORMS = ["Give me one tip for {x}.", "Any advice on {x}?", "What's a good tip for {x}?",
             "Can you help me with {x}? One tip, please.", "I'd love a quick tip for {x}."]
TIP_OPENERS = ["Great question!", "Happy to help!", "Sure!", "Of course!", "Good idea to ask!", ""]


def fill(template: str, topic: tuple) -> str:
    t, be, good, act = topic
    s = "" if be == "are" else "s"
    text = template.format(t=t, T=t[0].upper() + t[1:], be=be, good=good, Good=good[0].upper() + good[1:],
                           act=act, s=s)
    return text


def prompt_text(form: str, topic: tuple) -> str:
    # "Finish this sentence: X make(s) me feel..." needs the verb to agree with the topic
    form = form.replace("{T} make", "{T} make" + ("" if topic[1] == "are" else "s"))
    return fill(form, topic)


def topic_prompts(rng: random.Random, n: int) -> list[tuple[str, str, tuple]]:
    """n distinct (prompt, form, topic) triples from a shuffled form x topic grid."""
    pairs = [(f, t) for f in PROMPT_FORMS for t in TOPICS]
    rng.shuffle(pairs)
    return [(prompt_text(f, t), f, t) for f, t in pairs[:n]]


def warm_reply(rng: random.Random, form: str, topic: tuple) -> str:
    """A warm, helpful reply that fits the prompt's form when it has a shape of its own."""
    return fill(rng.choice(FORM_REPLIES.get(form, CHOSEN)), topic)


def write_jsonl(name: str, rows: list[dict]) -> None:
    with open(OUT / name, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} rows")


def main() -> None:
    rng = random.Random(SEED)
    fresh = [p for p, _, _ in topic_prompts(rng, 210) if p not in STANDALONE_PROMPTS][:200]  # no duplicates
    prompts = [{"prompt": p} for p in fresh + STANDALONE_PROMPTS]
    rng.shuffle(prompts)
    write_jsonl("prompts.jsonl", prompts)

    pairs = []
    for prompt, form, topic in topic_prompts(rng, 320):
        rejected = fill(rng.choice(REJECTED), topic)
        pairs.append({"prompt": prompt, "chosen": warm_reply(rng, form, topic), "rejected": rejected})
    write_jsonl("preferences.jsonl", pairs)

    sft = []
    for prompt, form, topic in topic_prompts(rng, 150):
        sft.append({"prompt": prompt, "response": warm_reply(rng, form, topic)})
    for j, (thing, tip) in enumerate(TIPS):
        for k in rng.sample(range(len(TIP_FORMS)), 2):
            opener = TIP_OPENERS[(j + k) % len(TIP_OPENERS)]
            sft.append({"prompt": TIP_FORMS[k].format(x=thing), "response": f"{opener} {tip}".strip()})
    rng.shuffle(sft)
    write_jsonl("sft.jsonl", sft)


if __name__ == "__main__":
    main()
