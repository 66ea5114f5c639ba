"""A synthetic, labelled corpus of short English product/movie/restaurant reviews.

Nothing can be downloaded, so the corpus is generated from a small grammar. The label
(0 negative, 1 positive) is drawn first, uniformly, and a review is then built to have
that sentiment with one of these constructions (weights in ``_STRUCTURES``):

* ``plain``: one opinion clause, "the battery was really great".
* ``negated``: the clause carries a negator whose scope flips the adjective's polarity
  ("the plot was not good", "the screen isn't bad at all", "it was far from perfect").
* ``contrast``: "A but B" / "A, however B" / "although A, B": the two clauses have
  opposite polarities and the label is the one of the main clause (B); A is often negated.
* ``multi``: two or three clauses of the same polarity plus neutral filler sentences.
* ``verdict``: a recommendation ("I would not recommend it", "will buy again"), with filler.
* ``sarcastic``: positive words in a negative review ("oh great, it broke after two days").

Then, per word, typos (swap/drop/double a letter, probability ``typo_rate``); and last,
``label_noise`` of the labels are flipped at random, so no model can reach 100 %.

Adjectives are split in two pools: the *common* pool appears in train and evaluation
texts, the *rare* pool only in evaluation texts (``rare_rate`` of their adjectives).
A model that only learns from the training texts (TF-IDF) cannot know what "superb" or
"dreadful" mean; a pretrained encoder can. That, and negation/contrast scope, is where
a contextual model genuinely helps; both are deliberate features of this benchmark, not
properties of real review data. Only ASCII text is produced (see sentiment.py on why).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Corpus", "generate"]

POSITIVE_COMMON = (
    "good",
    "great",
    "excellent",
    "amazing",
    "wonderful",
    "fantastic",
    "nice",
    "solid",
    "impressive",
    "perfect",
    "enjoyable",
    "reliable",
    "lovely",
    "awesome",
    "pleasant",
)
NEGATIVE_COMMON = (
    "bad",
    "terrible",
    "awful",
    "horrible",
    "poor",
    "disappointing",
    "boring",
    "cheap",
    "useless",
    "mediocre",
    "annoying",
    "broken",
    "weak",
    "unpleasant",
    "frustrating",
)
# Only in evaluation texts: words a model must have learned elsewhere.
POSITIVE_RARE = ("superb", "outstanding", "brilliant", "delightful", "flawless", "marvelous", "terrific", "stellar")
NEGATIVE_RARE = ("dreadful", "atrocious", "abysmal", "pathetic", "lousy", "shoddy", "dismal", "appalling")

DOMAINS = {
    "product": ("phone", "headphones", "blender", "laptop", "vacuum", "kettle", "charger", "camera"),
    "movie": ("movie", "film", "show", "sequel", "documentary"),
    "restaurant": ("restaurant", "cafe", "diner", "pizza place", "bistro"),
}
ASPECTS = {
    "product": ("battery", "screen", "sound", "build quality", "price", "design", "setup", "motor"),
    "movie": ("plot", "acting", "soundtrack", "ending", "dialogue", "pacing", "cast", "script"),
    "restaurant": ("food", "service", "staff", "pasta", "dessert", "atmosphere", "menu", "coffee"),
}
INTENSIFIERS = ("", "", "", "very ", "really ", "extremely ", "quite ", "so ", "incredibly ", "pretty ", "somewhat ")
FILLERS = (
    "I bought it last month.",
    "We went there on a friday.",
    "I watched it with my family.",
    "It arrived on tuesday.",
    "My friend told me about it.",
    "I have used it for a few weeks now.",
    "This is my second review.",
    "We ordered for four people.",
    "Long story short.",
    "Honestly.",
)
BE = (("was", "wasn't", "was not"), ("is", "isn't", "is not"))
SARCASTIC = (
    "oh great, the {aspect} stopped working after two days.",
    "yeah, what a fantastic way to waste an evening.",
    "just perfect, the {aspect} fell apart the first week.",
    "wow, amazing, another {item} that does not work.",
    "best purchase ever, said nobody. the {aspect} died in a week.",
    "brilliant, I waited an hour and the {aspect} was cold.",
)
POSITIVE_VERDICTS = (
    "I would recommend it.",
    "would buy again.",
    "highly recommended.",
    "I will be back.",
    "five stars.",
    "worth every penny.",
    "I can not complain.",
    "no regrets at all.",
)
NEGATIVE_VERDICTS = (
    "I would not recommend it.",
    "never buying again.",
    "avoid it.",
    "I will not be back.",
    "one star.",
    "not worth the money.",
    "I want a refund.",
    "what a waste.",
)
_STRUCTURES = (("plain", 3), ("negated", 3), ("contrast", 3), ("multi", 2), ("verdict", 1), ("sarcastic", 1))


@dataclass(frozen=True, slots=True)
class Corpus:
    texts: list[str]
    labels: list[int]  # 0 negative, 1 positive (after label noise)
    kinds: list[str]  # construction of each text, for analysis and tests


class _Generator:
    def __init__(self, rng: random.Random, *, rare_rate: float, typo_rate: float) -> None:
        self.rng = rng
        self.rare_rate = rare_rate
        self.typo_rate = typo_rate

    def adjective(self, positive: bool) -> str:
        r = self.rng
        rare = r.random() < self.rare_rate
        pool = (
            (POSITIVE_RARE if rare else POSITIVE_COMMON) if positive else (NEGATIVE_RARE if rare else NEGATIVE_COMMON)
        )
        return r.choice(pool)

    def clause(self, domain: str, polarity: int, *, negate: bool | None = None) -> str:
        """One opinion clause whose overall polarity is ``polarity``; a negator flips its adjective."""
        r = self.rng
        if negate is None:
            negate = r.random() < 0.3
        # negated clauses carry the opposite adjective: "not bad" is positive
        adjective = self.adjective(positive=bool(polarity) != negate)
        subject = r.choice(("the " + r.choice(ASPECTS[domain]), "the " + r.choice(DOMAINS[domain]), "it"))
        be = r.choice(BE)
        if not negate:
            return f"{subject} {be[0]} {r.choice(INTENSIFIERS)}{adjective}"
        form = r.choice(("neg", "neg", "never", "far", "hardly"))
        if form == "never":
            return f"{subject} {be[0]} never {adjective}"
        if form == "far":
            return f"{subject} {be[0]} far from {adjective}"
        if form == "hardly":
            return f"{subject} {be[0]} hardly {adjective}"
        tail = r.choice(("", "", " at all"))
        return f"{subject} {r.choice(be[1:])} {r.choice(('', '', 'very ', 'that '))}{adjective}{tail}"

    def review(self, label: int) -> tuple[str, str]:
        r = self.rng
        domain = r.choice(tuple(DOMAINS))
        kind = r.choices([k for k, _ in _STRUCTURES], weights=[w for _, w in _STRUCTURES])[0]
        if kind == "sarcastic" and label == 1:
            kind = "contrast"  # sarcasm is a negative construction here
        if kind == "plain":
            text = self.clause(domain, label, negate=False) + "."
        elif kind == "negated":
            text = self.clause(domain, label, negate=True) + "."
        elif kind == "contrast":
            first = self.clause(domain, 1 - label, negate=r.random() < 0.4)
            second = self.clause(domain, label)
            pattern = r.choice(("{a}, but {b}.", "{a}. however, {b}.", "although {a}, {b}.", "{a}, yet {b}."))
            text = pattern.format(a=first, b=second)
        elif kind == "multi":
            parts = [self.clause(domain, label) + "." for _ in range(r.randint(2, 3))]
            parts.insert(r.randint(0, len(parts)), r.choice(FILLERS))
            text = " ".join(parts)
        elif kind == "verdict":
            verdict = r.choice(POSITIVE_VERDICTS if label else NEGATIVE_VERDICTS)
            text = f"{r.choice(FILLERS)} {verdict}"
        else:  # sarcastic
            text = r.choice(SARCASTIC).format(aspect=r.choice(ASPECTS[domain]), item=r.choice(DOMAINS[domain]))
        text = self.typos(text)
        return (text[0].upper() + text[1:] if r.random() < 0.5 else text), kind

    def typos(self, text: str) -> str:
        r = self.rng
        words = text.split(" ")
        for i, word in enumerate(words):
            if len(word) > 3 and r.random() < self.typo_rate:
                j = r.randrange(len(word) - 1)
                op = r.randrange(3)
                if op == 0:
                    word = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
                elif op == 1:
                    word = word[:j] + word[j + 1 :]
                else:
                    word = word[:j] + word[j] + word[j:]
                words[i] = word
        return " ".join(words)


def generate(
    n: int,
    *,
    seed: int,
    rare_rate: float = 0.0,
    typo_rate: float = 0.04,
    label_noise: float = 0.03,
) -> Corpus:
    """``n`` reviews, deterministic for ``seed``; see the module doc for the grammar."""
    rng = random.Random(seed)
    gen = _Generator(rng, rare_rate=rare_rate, typo_rate=typo_rate)
    texts, labels, kinds = [], [], []
    for _ in range(n):
        label = rng.randrange(2)
        text, kind = gen.review(label)
        if rng.random() < label_noise:
            label = 1 - label
        texts.append(text)
        labels.append(label)
        kinds.append(kind)
    return Corpus(texts, labels, kinds)
