"""The bundled knowledge world: a deterministic, fictional world rendered into documents and
training files in the reference formats.

Entities of five kinds (person, organisation, city, country, work) get random attributes and
random relations to each other. Every entity has one document: its facts, each written with one
of several phrasings, in random order, plus distractor sentences that state facts about other
entities of the same kind. From the documents:
  corpus.jsonl  {"id", "title", "text"}, one per document
  stage1.jsonl  one "qa" row (every fact of the document as a question) and one "paraphrase"
                row (the same facts, other phrasings and order) per document
  stage2.jsonl  question, K0=5 documents (gold among hard distractors), answer = gold_answer,
                pos_index (the gold documents)
  stage3.jsonl  question, 20 candidates, pos_index, answer; single-hop and two-hop questions
                (two-hop: the answer needs the subject's document and the bridge entity's)

Two worlds, `train` and `heldout`, share relation types and value vocabularies but no entity
names. Values are drawn uniformly at random, so a closed-book model can only guess:
`frequency_baseline` measures the best answer-prior guess per question type.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

# WORLD_SIZES ("small", "medium/small", ...) is defined in clara_jax.config, whose validation
# of demo.world_size needs it; SIZES holds exactly config.WORLD_SIZE_NAMES (tests/test_config).
from clara_jax.config import WORLD_SIZES

SIZES = {
    # entities per world: countries, cities, people, organisations, works
    "small": dict(country=8, city=30, person=80, organisation=30, work=40),
    "medium": dict(country=40, city=250, person=900, organisation=300, work=500),
}
SPLITS = ("train", "heldout")
STAGE2_DOCS = 5
STAGE3_CANDIDATES = 20
FILES = ("corpus.jsonl", "stage1.jsonl", "stage2.jsonl", "stage3.jsonl")

OCCUPATIONS = ("baker", "carpenter", "cartographer", "chemist", "composer", "diplomat",
               "engineer", "farmer", "glassblower", "historian", "jeweller", "librarian",
               "mathematician", "navigator", "painter", "physician", "potter", "sculptor",
               "tailor", "weaver")
HOBBIES = ("beekeeping", "chess", "fencing", "gardening", "kite flying", "knitting",
           "mountaineering", "origami", "rowing", "sailing", "stargazing", "whittling",
           "archery", "birdwatching", "calligraphy", "juggling")
INDUSTRIES = ("shipbuilding", "textiles", "publishing", "mining", "brewing", "banking",
              "clockmaking", "printing", "glassmaking", "railways", "pottery", "insurance")
ANIMALS = ("otter", "heron", "lynx", "badger", "falcon", "stag", "wolf", "crane", "boar",
           "swan", "fox", "owl")
WORK_KINDS = ("novel", "opera", "film", "painting", "symphony", "poem")
GENRES = ("comedy", "tragedy", "romance", "mystery", "satire", "fable", "epic", "elegy")
ADJECTIVES = ("Silent", "Golden", "Broken", "Hidden", "Last", "Crimson", "Distant", "Quiet",
              "Burning", "Frozen", "Wandering", "Forgotten", "Hollow", "Iron", "Paper",
              "Velvet", "Seventh", "Northern", "Bitter", "Patient", "Little", "Endless",
              "Painted", "Sleeping", "Salt")
NOUNS = ("Harbour", "Lantern", "Orchard", "Mirror", "Garden", "Bridge", "Tower", "River",
         "Winter", "Letter", "Clock", "Crown", "Island", "Feather", "Meadow", "Voyage", "Door",
         "Bell", "Compass", "Shadow", "Anchor", "Candle", "Market", "Well", "Staircase")
ORG_SUFFIXES = ("Industries", "Guild", "Institute", "Works", "Company", "Society", "Foundry",
                "Trust", "Brothers", "Cooperative")
COUNTRY_SUFFIXES = ("ia", "land", "mark", "ora", "esh")
CITY_SUFFIXES = ("", "", "", "ford", "holm", "grad", "port", "wick", "by")
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
          "st", "th", "gr", "tr", "sh", "ch", "h", "j", "w")
VOWELS = ("a", "e", "i", "o", "u", "ae", "ai", "ei", "ou", "ia")
CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "k", "nd", "rt")


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _frozen(x):
    """JSON lists as tuples, all the way down (the tables are constants)."""
    if isinstance(x, list):
        return tuple(_frozen(y) for y in x)
    if isinstance(x, dict):
        return {k: _frozen(v) for k, v in x.items()}
    return x


def _load_templates() -> dict:
    """world_templates.json, whose `_format` field says what each table holds."""
    raw = json.loads(Path(__file__).with_name("world_templates.json").read_text("utf-8"))
    return {name: _frozen(table) for name, table in raw.items() if not name.startswith("_")}


_TEMPLATES = _load_templates()
# Per kind: attribute -> (question templates, sentence templates, kind of a related entity or
# None for a plain value). {s} is the subject's name, {v} the value, {a} its article.
ATTRS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...], str | None]]] = \
    _TEMPLATES["attributes"]
# Two-hop questions: (subject kind, first attribute (a relation), second attribute of the
# related entity, question template).
CHAINS: tuple[tuple[str, str, str, str], ...] = _TEMPLATES["chains"]
INTRO: dict[str, tuple[str, ...]] = _TEMPLATES["intro"]
DISTRACTOR: tuple[str, ...] = _TEMPLATES["distractor"]


@dataclass
class Entity:
    kind: str
    name: str
    facts: dict[str, str] = field(default_factory=dict)  # attribute -> value (names for relations)
    doc_id: str = ""


@dataclass
class Question:
    question: str
    answer: str
    qtype: str  # "kind.attr" or "kind.attr>attr" for two-hop
    gold: tuple[str, ...]  # doc ids
    hops: int


@dataclass
class World:
    split: str
    seed: int
    entities: list[Entity]
    docs: dict[str, str]  # doc id -> text
    paraphrases: dict[str, str]  # doc id -> paraphrase text
    mentions: dict[str, set[str]]  # entity name -> doc ids whose text mentions it
    questions: list[Question]

    @property
    def by_name(self) -> dict[str, Entity]:
        return {e.name: e for e in self.entities}


class _Names:
    """Unique fictional names; shared by both worlds so that they never share an entity."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def _word(self, syllables: int) -> str:
        r = self.rng
        w = "".join(r.choice(ONSETS) + r.choice(VOWELS) for _ in range(syllables - 1))
        w += r.choice(ONSETS) + r.choice(VOWELS) + r.choice(CODAS)
        return w.capitalize()

    def _unique(self, make) -> str:
        for _ in range(10000):
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError("ran out of unique names")

    def make(self, kind: str) -> str:
        r = self.rng
        if kind == "person":
            return self._unique(lambda: f"{self._word(2)} {self._word(2)}")
        if kind == "city":
            return self._unique(lambda: self._word(2) + r.choice(CITY_SUFFIXES))
        if kind == "country":
            return self._unique(lambda: self._word(2) + r.choice(COUNTRY_SUFFIXES))
        if kind == "organisation":
            return self._unique(lambda: f"{self._word(2)} {r.choice(ORG_SUFFIXES)}")
        if kind == "work":
            def work():
                title = f"The {r.choice(ADJECTIVES)} {r.choice(NOUNS)}"
                return title if r.random() < 0.7 else f"{title} of {self._word(2)}"
            return self._unique(work)
        raise ValueError(kind)


# Value vocabularies shared by both worlds (fixed, independent of the seed).
_VOCAB_RNG = random.Random(20251125)
LANGUAGES = tuple(sorted({_Names(_VOCAB_RNG)._word(2) + "ic" for _ in range(16)}))
CURRENCIES = tuple(sorted({_Names(_VOCAB_RNG)._word(2).lower() for _ in range(16)}))
LANDMARKS = tuple(f"{a} {n}" for a in ("Old", "Great", "Royal", "High", "Twin")
                  for n in ("Bridge", "Gate", "Tower", "Cathedral", "Market", "Fountain"))


def _populate(rng: random.Random, names: _Names, counts: dict[str, int], split: str
              ) -> list[Entity]:
    ents = {k: [Entity(k, names.make(k)) for _ in range(n)] for k, n in counts.items()}
    for k, lst in ents.items():
        for i, e in enumerate(lst):
            e.doc_id = f"{split}-{k}-{i:04d}"
    countries, cities = ents["country"], ents["city"]
    people, orgs, works = ents["person"], ents["organisation"], ents["work"]
    for i, c in enumerate(cities):
        # The first cities go round-robin so that every country has one (its capital).
        c.facts["country"] = (countries[i].name if i < len(countries)
                              else rng.choice(countries).name)
        c.facts["population"] = f"{rng.randint(2, 990) * 1000:,}"
        c.facts["founded"] = str(rng.randint(900, 1800))
        c.facts["mayor"] = rng.choice(people).name
        c.facts["landmark"] = rng.choice(LANDMARKS)
    for k in countries:
        own = [c.name for c in cities if c.facts["country"] == k.name]
        k.facts["capital"] = rng.choice(own)
        k.facts["language"] = rng.choice(LANGUAGES)
        k.facts["currency"] = rng.choice(CURRENCIES)
        k.facts["independence"] = str(rng.randint(1600, 1990))
        k.facts["animal"] = rng.choice(ANIMALS)
    for p in people:
        p.facts["birth_year"] = str(rng.randint(1700, 1990))
        p.facts["birthplace"] = rng.choice(cities).name
        p.facts["occupation"] = rng.choice(OCCUPATIONS)
        p.facts["employer"] = rng.choice(orgs).name
        p.facts["hobby"] = rng.choice(HOBBIES)
    for o in orgs:
        o.facts["founded"] = str(rng.randint(1650, 2000))
        o.facts["headquarters"] = rng.choice(cities).name
        o.facts["founder"] = rng.choice(people).name
        o.facts["industry"] = rng.choice(INDUSTRIES)
        o.facts["employees"] = f"{rng.randint(5, 5000):,}"
    for w in works:
        w.facts["creator"] = rng.choice(people).name
        w.facts["year"] = str(rng.randint(1700, 2020))
        w.facts["genre"] = rng.choice(GENRES)
        w.facts["kind"] = rng.choice(WORK_KINDS)
    return [e for k in ("country", "city", "person", "organisation", "work") for e in ents[k]]


def short_name(e: Entity) -> str:
    """How a document refers to its subject after the first mention (keeps documents short):
    a person's family name, an organisation's first word, a work's title without "of ..."."""
    if e.kind == "person":
        return e.name.split()[-1]
    if e.kind == "organisation":
        return e.name.split()[0]
    if e.kind == "work":
        return e.name.split(" of ")[0]
    return e.name


def _sentence(rng: random.Random, e: Entity, attr: str, name: str, avoid: int | None = None
              ) -> tuple[str, int]:
    templates = ATTRS[e.kind][attr][1]
    choices = [i for i in range(len(templates)) if i != avoid]
    i = rng.choice(choices)
    v = e.facts[attr]
    text = templates[i].format(s=name, v=v, a=_article(v), k=e.facts.get("kind", "work"))
    return text[0].upper() + text[1:], i


def _render(rng: random.Random, e: Entity, others: list[Entity], avoid: dict[str, int] | None
            ) -> tuple[str, dict[str, int], list[str]]:
    """One document: maybe an intro, the entity's facts in random order and 1-3 distractor facts
    about other entities of the same kind. The subject is named in full first, then by
    `short_name`. Returns (text, phrasing chosen per attribute, names mentioned)."""
    attrs = list(ATTRS[e.kind])
    rng.shuffle(attrs)
    # The intro is filler; half of the documents start straight with a fact.
    sentences = [rng.choice(INTRO[e.kind]).format(s=e.name)] if rng.random() < 0.5 else []
    chosen, mentioned = {}, []
    for attr in attrs:
        name = e.name if not sentences else short_name(e)
        text, chosen[attr] = _sentence(rng, e, attr, name, (avoid or {}).get(attr))
        sentences.append(text)
        if ATTRS[e.kind][attr][2]:
            mentioned.append(e.facts[attr])
    distractors = rng.sample(others, k=min(len(others), rng.randint(1, 3)))
    for o in distractors:
        # After the first sentence, so that the document still opens with its subject.
        at = rng.randrange(1, len(sentences) + 1)
        fact, _ = _sentence(rng, o, rng.choice(list(ATTRS[o.kind])), o.name)
        if rng.random() < 0.3:
            fact = rng.choice(DISTRACTOR).format(s=short_name(e), o=o.name, kind=o.kind) + \
                " " + fact
        sentences.insert(at, fact)
        mentioned.append(o.name)
    # Paragraph breaks make the documents look less like a list of sentences.
    cut = rng.randrange(2, max(3, len(sentences)))
    return (" ".join(sentences[:cut]) + "\n" + " ".join(sentences[cut:])).strip(), chosen, \
        mentioned


def make_world(seed: int = 0, size: str = "small", split: str = "train",
               names: _Names | None = None) -> World:
    """One world. Use `make_worlds` for the disjoint train/heldout pair."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    rng = random.Random(f"clara-world/{seed}/{split}")
    names = names or _Names(random.Random(f"clara-names/{seed}"))
    entities = _populate(rng, names, SIZES[size], split)
    by_kind = defaultdict(list)
    for e in entities:
        by_kind[e.kind].append(e)
    docs, paraphrases, mentions = {}, {}, defaultdict(set)
    for e in entities:
        others = [o for o in by_kind[e.kind] if o is not e]
        text, chosen, mentioned = _render(rng, e, others, None)
        docs[e.doc_id] = text
        paraphrases[e.doc_id], _, _ = _render(rng, e, others, chosen)
        for name in mentioned:
            mentions[name].add(e.doc_id)
    by_name = {e.name: e for e in entities}
    questions = []
    for e in entities:
        for attr, (qs, _, _) in ATTRS[e.kind].items():
            questions.append(Question(rng.choice(qs).format(s=e.name), e.facts[attr],
                                      f"{e.kind}.{attr}", (e.doc_id,), 1))
        for kind, first, second, template in CHAINS:
            if kind != e.kind:
                continue
            bridge = by_name[e.facts[first]]
            questions.append(Question(template.format(s=e.name), bridge.facts[second],
                                      f"{kind}.{first}>{second}", (e.doc_id, bridge.doc_id), 2))
    return World(split, seed, entities, docs, paraphrases, dict(mentions), questions)


def split_sizes(size: str) -> dict[str, str]:
    """"small" -> both worlds small; "TRAIN/HELDOUT" -> each its own. Raises ValueError."""
    if size not in WORLD_SIZES:
        raise ValueError(f"world size must be one of {WORLD_SIZES}, got {size!r}")
    train, _, heldout = size.partition("/")
    return {"train": train, "heldout": heldout or train}


def make_worlds(seed: int = 0, size: str = "small") -> dict[str, World]:
    """The `train` and `heldout` worlds (sizes as `split_sizes`): same relation types, no
    shared entity names."""
    names = _Names(random.Random(f"clara-names/{seed}"))
    sizes = split_sizes(size)
    return {split: make_world(seed, sizes[split], split, names) for split in SPLITS}


class _Sampler:
    """Negative documents for a question: hard ones first (documents that mention the subject,
    documents about entities of the same kind), then random documents."""

    def __init__(self, rng: random.Random, world: World):
        self.rng, self.world = rng, world
        self.by_id = {e.doc_id: e for e in world.entities}
        self.same_kind = defaultdict(list)
        for e in world.entities:
            self.same_kind[e.kind].append(e.doc_id)
        self.all_ids = list(world.docs)

    def negatives(self, q: Question, n: int) -> list[str]:
        rng, gold = self.rng, set(q.gold)
        subject = self.by_id[q.gold[0]]
        hard = sorted(self.world.mentions.get(subject.name, set()) - gold)
        rng.shuffle(hard)
        same = [d for d in rng.sample(self.same_kind[subject.kind],
                                      k=min(len(self.same_kind[subject.kind]), n + len(gold)))
                if d not in gold]
        picked = list(dict.fromkeys(hard[: n // 3] + same[: n // 3]))
        if len(self.all_ids) < n + len(gold):
            raise ValueError(f"the world has {len(self.all_ids)} documents, fewer than "
                             f"{n + len(gold)} needed per question")
        taken = gold | set(picked)
        while len(picked) < n:  # rejection sampling: the world is much larger than n
            d = rng.choice(self.all_ids)
            if d not in taken:
                taken.add(d)
                picked.append(d)
        return picked

    def mixed(self, q: Question, total: int) -> tuple[list[str], list[int]]:
        ids = list(q.gold) + self.negatives(q, total - len(q.gold))
        self.rng.shuffle(ids)
        pos = [ids.index(g) for g in q.gold]  # hop order: the subject's document first
        return [self.world.docs[i] for i in ids], pos


def world_rows(world: World) -> dict[str, list[dict]]:
    """The reference-format rows of one world, by file name."""
    rng = random.Random(f"clara-rows/{world.seed}/{world.split}")
    corpus = [{"id": e.doc_id, "title": e.name, "text": world.docs[e.doc_id]}
              for e in world.entities]
    single = defaultdict(list)
    for q in world.questions:
        if q.hops == 1:
            single[q.gold[0]].append(q)
    stage1 = []
    for e in world.entities:
        qa = single[e.doc_id]
        doc = world.docs[e.doc_id]
        stage1.append({"data_type": "qa", "question": [q.question for q in qa],
                       "answers": [q.answer for q in qa], "docs": [doc]})
        stage1.append({"data_type": "paraphrase", "question": "",
                       "answers": [world.paraphrases[e.doc_id]], "docs": [doc]})
    sampler = _Sampler(rng, world)
    stage2, stage3 = [], []
    for q in world.questions:
        docs, pos = sampler.mixed(q, STAGE2_DOCS)
        stage2.append({"question": q.question, "docs": docs, "gold_answer": q.answer,
                       "answer": q.answer, "pos_index": pos})
        docs, pos = sampler.mixed(q, STAGE3_CANDIDATES)
        stage3.append({"question": q.question, "docs": docs, "pos_index": pos,
                       "answer": q.answer})
    return {"corpus.jsonl": corpus, "stage1.jsonl": stage1, "stage2.jsonl": stage2,
            "stage3.jsonl": stage3}


def write_world(out: str | os.PathLike, seed: int = 0, size: str = "small") -> dict:
    """Writes OUT/{train,heldout}/{corpus,stage1,stage2,stage3}.jsonl and OUT/world.json.

    Everything is written into a temporary directory beside OUT first and moved into place
    file by file, so a failure never leaves a half-written file. Returns the summary.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    summary = {"seed": seed, "size": size, "splits": {}}
    try:
        worlds = make_worlds(seed, size)
        for split, world in worlds.items():
            (tmp / split).mkdir(parents=True)
            rows = world_rows(world)
            for name, lst in rows.items():
                with open(tmp / split / name, "w", encoding="utf-8") as f:
                    for row in lst:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            kinds = Counter(e.kind for e in world.entities)
            hops = Counter(q.hops for q in world.questions)
            summary["splits"][split] = {
                "entities": dict(kinds), "documents": len(world.docs),
                "rows": {name: len(lst) for name, lst in rows.items()},
                "questions": {"single_hop": hops[1], "two_hop": hops[2]},
                "words_per_doc": _percentiles([len(t.split()) for t in world.docs.values()])}
        (tmp / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)
            for name in FILES:
                os.replace(tmp / split / name, out / split / name)
        os.replace(tmp / "world.json", out / "world.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _percentiles(values: list[int] | list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, np.float64)
    return {"min": float(a.min()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "mean": round(float(a.mean()), 2)}


def frequency_baseline(train: World, evaluate: World) -> dict[str, float]:
    """Closed-book guessing: for each question type, answer with the most frequent training
    answer of that type. Returns the exact-match accuracy on `evaluate` (on its own questions
    and on the training world's) and the chance level (mean of 1/#distinct answers per type)."""
    by_type = defaultdict(Counter)
    for q in train.questions:
        by_type[q.qtype][q.answer] += 1
    guess = {t: c.most_common(1)[0][0] for t, c in by_type.items()}

    def accuracy(world: World) -> float:
        hits = [guess.get(q.qtype) == q.answer for q in world.questions]
        return sum(hits) / max(len(hits), 1)

    chance = [1.0 / len(by_type[q.qtype]) for q in evaluate.questions if q.qtype in by_type]
    return {"heldout_accuracy": accuracy(evaluate), "train_accuracy": accuracy(train),
            "chance": sum(chance) / max(len(chance), 1)}


def focused(w: World) -> World:
    """`w` with each document cut to the sentences that name its subject (dropping the facts
    of other entities that documents carry as distractors): a pretraining curriculum, where
    any value of the asked relation that the latents hold is the answer."""
    docs = {}
    for e in w.entities:
        names = (e.name, short_name(e))
        sentences = re.split(r"(?<=\.)\s+", w.docs[e.doc_id])
        docs[e.doc_id] = " ".join(x for x in sentences if any(n in x for n in names))
    return replace(w, docs=docs)


def _question_patterns() -> list[tuple[re.Pattern, str]]:
    # Two-hop templates first: "Who is the mayor of {s}?" also matches "... of the capital of X?".
    patterns = [(q, f"{first}>{second}") for _, first, second, q in CHAINS]
    for attrs in ATTRS.values():
        for attr, (questions, _, _) in attrs.items():
            patterns += [(q, attr) for q in questions]
    return [(re.compile(re.escape(q).replace(re.escape("{s}"), ".+") + "$"), label)
            for q, label in patterns]


_PATTERNS = _question_patterns()


def question_type(question: str) -> str:
    """The relation a world question asks for: its attribute ("hobby"; "founded" covers cities
    and organisations alike) or, for two-hop questions, "first>second" ("employer>founder");
    "other" for a question no template wrote."""
    for pattern, label in _PATTERNS:
        if pattern.match(question.strip()):
            return label
    return "other"
