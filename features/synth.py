"""A seeded, realistic synthetic gift shop written through the landing-zone contract.

``generate_shop`` writes ``products``, ``users`` and ``events`` partitions for a run of days.
The shop is small enough to build in seconds yet carries real, learnable signal:

* a catalogue of 8 gift-shop categories, each with its own nouns and materials, 12 invented
  brands with category affinities, log-normal prices per category and Zipf-like popularity
  inside each category; new products arrive over time and get a novelty boost so they are
  discoverable; now and then a product's price changes;
* users with latent tastes: a concentrated Dirichlet preference over categories (one or two
  favourites), a brand affinity and a very uneven activity level;
* sessions of views drawn from the user's taste, some turning into carts and purchases,
  repeat purchases of things bought before, and searches whose query comes from the title of
  a product the user likes, followed by views of matching products.

Everything is drawn from one ``numpy.random.default_rng(seed)`` in a fixed order, and
``contract.write_partition`` writes sorted rows without wall-clock metadata, so the same
arguments give byte-identical files.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from features import contract

# category -> (nouns, materials, median price in GBP). Nouns and materials are per category so
# that titles (and therefore search queries) say something about the category.
CATEGORIES: dict[str, tuple[tuple[str, ...], tuple[str, ...], float]] = {
    "candles": (
        ("Pillar Candle", "Tealight Holder", "Scented Candle", "Candle Jar", "Taper Candles",
         "Lantern"),
        ("Soy Wax", "Beeswax", "Glass", "Zinc", "Frosted", "Amber"),
        7.5,
    ),
    "mugs": (
        ("Mug", "Teacup and Saucer", "Espresso Cup", "Travel Mug", "Teapot", "Mug Set"),
        ("Stoneware", "Enamel", "Porcelain", "Bone China", "Speckled", "Ceramic"),
        9.0,
    ),
    "bags": (
        ("Tote Bag", "Shopper", "Lunch Bag", "Wash Bag", "Drawstring Bag", "Jute Bag"),
        ("Canvas", "Jute", "Cotton", "Oilcloth", "Quilted", "Leather"),
        12.0,
    ),
    "cushions": (
        ("Cushion", "Cushion Cover", "Floor Cushion", "Bolster", "Seat Pad"),
        ("Velvet", "Linen", "Wool", "Embroidered", "Knitted", "Corduroy"),
        18.0,
    ),
    "lamps": (
        ("Table Lamp", "String Lights", "Night Light", "Lamp Shade", "Fairy Lights"),
        ("Rattan", "Brass", "Paper", "Opal Glass", "Wicker", "Metal"),
        28.0,
    ),
    "frames": (
        ("Photo Frame", "Picture Frame", "Collage Frame", "Mirror Frame"),
        ("Oak", "Gilt", "Driftwood", "Silver", "Walnut", "Painted"),
        14.0,
    ),
    "clocks": (
        ("Wall Clock", "Alarm Clock", "Mantel Clock", "Kitchen Clock"),
        ("Station", "Wooden", "Chrome", "Slate", "Bamboo", "Retro Dial"),
        22.0,
    ),
    "toys": (
        ("Wooden Train", "Jigsaw Puzzle", "Skittles Set", "Spinning Top", "Rag Doll",
         "Tin Robot"),
        ("Beechwood", "Felt", "Tinplate", "Knitted Wool", "Painted Wood", "Patchwork"),
        10.0,
    ),
}
CATEGORY_NAMES = tuple(CATEGORIES)
# How common each category is as somebody's favourite (candles and mugs sell most in a gift shop).
CATEGORY_SHARE = np.array([0.18, 0.17, 0.14, 0.12, 0.1, 0.1, 0.08, 0.11])

ADJECTIVES = (
    "Vintage", "Rustic", "Scandi", "Retro", "Botanical", "Woodland", "Nordic", "Folk",
    "Classic", "Little", "Large", "Striped", "Spotty", "Floral", "Hand-painted", "Coastal",
)
COLOURS = (
    "Sage", "Ivory", "Mustard", "Navy", "Blush", "Copper", "Teal", "Charcoal", "Red",
    "Cream", "Forest Green", "Duck Egg",
)

# Invented brands and the categories each is known for (the rest get a small weight).
BRANDS: dict[str, tuple[str, ...]] = {
    "Hollowbrook": ("candles", "lamps"),
    "Marlow & Finch": ("mugs", "frames"),
    "Juniper Lane": ("cushions", "bags"),
    "Kettleby": ("mugs", "clocks"),
    "Wrenfield": ("toys",),
    "Old Quay": ("bags", "frames", "clocks"),
    "Bramble & Co": ("candles", "cushions"),
    "Tidewell": ("lamps", "clocks"),
    "Larkspur": ("cushions", "candles", "mugs"),
    "Copperleaf": ("lamps", "frames"),
    "Northfold": ("bags", "toys"),
    "Puddingstone": ("toys", "mugs"),
}
BRAND_NAMES = tuple(BRANDS)

DESCRIPTION_TEMPLATES = (
    "A {adj} {noun} in {colour} {material}, from {brand}.",
    "{brand}'s {noun} in {material}: {adj}, {colour} and made to be given.",
    "Our {adj} {colour} {noun}, made in {material} by {brand}.",
    "{material} {noun} by {brand}, finished in {colour} with a {adj} look.",
)

# Country of each user; the shop is British and sells mostly at home.
COUNTRIES = (
    ("United Kingdom", 0.70), ("Germany", 0.07), ("France", 0.06), ("EIRE", 0.03),
    ("Spain", 0.03), ("Netherlands", 0.025), ("Belgium", 0.02), ("Switzerland", 0.015),
    ("Portugal", 0.015), ("Italy", 0.01), ("Norway", 0.01), ("Australia", 0.01),
)

# Behaviour knobs. Tuned so that the defaults give ~10-15k events and 1k+ purchases.
NEW_PRODUCT_SHARE = 0.2  # of all products, arriving after day 0
LATE_SIGNUP_SHARE = 0.25  # of users, signing up after day 0
PRICE_CHANGE_RATE = 0.004  # per product and day
ZIPF_EXPONENT = 0.9
NOVELTY_BOOST, NOVELTY_DAYS = 4.0, 4.0  # new products' weight x (1 + 4 e^(-age/4))
SEARCH_SHARE, REPEAT_SHARE = 0.18, 0.3  # session kinds (repeat only with a purchase history)
STAY_IN_CATEGORY = 0.8  # a browse view stays in the session's category
BRAND_LED = 0.35  # a view picked by the user's favourite brands rather than popularity
CART_RATE, BUY_RATE = 0.25, 0.6  # view -> cart, cart -> purchase
REPEAT_CART_RATE, REPEAT_BUY_RATE = 0.65, 0.8  # for a product bought before
QUANTITIES, QUANTITY_P = np.array([1, 2, 3, 4, 6]), np.array([0.62, 0.22, 0.1, 0.04, 0.02])
MAX_VIEWS = 12
DAY_US = 86_400_000_000


@dataclass(frozen=True)
class SynthSummary:
    """What ``generate_shop`` wrote."""

    root: str
    start: dt.date
    days: int
    n_users: int
    n_products: int
    n_events: int
    n_purchases: int
    n_searches: int
    new_products_after_day0: int

    def __str__(self) -> str:
        last = self.start + dt.timedelta(days=self.days - 1)
        return (
            f"synthetic shop: {self.days} day{'s' if self.days != 1 else ''} "
            f"({self.start}..{last}), {self.n_users:,} users, "
            f"{self.n_products:,} products ({self.new_products_after_day0:,} new after day 0), "
            f"{self.n_events:,} events ({self.n_purchases:,} purchases, "
            f"{self.n_searches:,} searches) -> {self.root}"
        )


@dataclass
class _Catalogue:
    """All products ever, indexed 0..P-1 (ids follow the index)."""

    product_id: np.ndarray  # (P,) object
    title: np.ndarray  # (P,) object
    description: np.ndarray  # (P,) object
    category: np.ndarray  # (P,) int category index
    brand: np.ndarray  # (P,) int brand index
    base_price: np.ndarray  # (P,) float
    arrival_day: np.ndarray  # (P,) int
    popularity: np.ndarray  # (P,) float, Zipf weight inside the category
    title_words: list[list[str]]  # lowercase words of the title, for queries
    tokens: np.ndarray  # (P, V) bool: product title contains vocabulary word v
    vocab: dict[str, int]


def _sample_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs`` (N, K), by inverse CDF; returns (N,) ints."""
    cum = probs.cumsum(axis=1)
    u = rng.random(len(probs))[:, None] * cum[:, -1:]
    return np.minimum((u > cum).sum(axis=1), probs.shape[1] - 1)


def _build_catalogue(rng: np.random.Generator, n_products: int, days: int) -> _Catalogue:
    n_cat, n_brand = len(CATEGORY_NAMES), len(BRAND_NAMES)
    # keep at least one product per category on day 0, so every taste has something to view
    n_new = min(int(round(NEW_PRODUCT_SHARE * n_products)), n_products - n_cat) if days > 1 else 0
    arrival = np.zeros(n_products, dtype=np.int64)
    if n_new:
        arrival[n_products - n_new:] = np.sort(rng.integers(1, days, n_new))
    category = rng.choice(n_cat, size=n_products, p=CATEGORY_SHARE)
    n_initial = n_products - n_new
    category[rng.permutation(n_initial)[:n_cat]] = np.arange(n_cat)
    # brand affinity: strong for a brand's own categories, small elsewhere
    affinity = np.full((n_cat, n_brand), 0.05)
    for b, cats in enumerate(BRANDS.values()):
        for c in cats:
            affinity[CATEGORY_NAMES.index(c), b] = 1.0
    brand = _sample_rows(rng, affinity[category])

    medians = np.array([CATEGORIES[c][2] for c in CATEGORY_NAMES])
    price = np.round(medians[category] * rng.lognormal(0.0, 0.35, n_products), 2)
    price = np.maximum(price, 0.5)

    # Zipf popularity by a random rank inside the category
    popularity = np.empty(n_products)
    for c in range(n_cat):
        idx = np.flatnonzero(category == c)
        ranks = rng.permutation(len(idx)) + 1
        popularity[idx] = 1.0 / ranks**ZIPF_EXPONENT

    adj_i = rng.integers(0, len(ADJECTIVES), n_products)
    col_i = rng.integers(0, len(COLOURS), n_products)
    uses_material = rng.random(n_products) < 0.5
    mat_i = rng.integers(0, 6, n_products)
    noun_u = rng.random(n_products)
    tmpl_i = rng.integers(0, len(DESCRIPTION_TEMPLATES), n_products)
    titles, descriptions, words = [], [], []
    for p in range(n_products):
        nouns, materials, _ = CATEGORIES[CATEGORY_NAMES[category[p]]]
        noun = nouns[int(noun_u[p] * len(nouns))]
        material = materials[mat_i[p]]
        colour = COLOURS[col_i[p]]
        adj = ADJECTIVES[adj_i[p]]
        title = f"{adj} {material if uses_material[p] else colour} {noun}"
        titles.append(title)
        words.append(title.lower().split())
        text = DESCRIPTION_TEMPLATES[tmpl_i[p]].format(
            adj=adj.lower(), noun=noun.lower(), colour=colour.lower(),
            material=material.lower(), brand=BRAND_NAMES[brand[p]],
        )
        descriptions.append(text[0].upper() + text[1:])
    vocab: dict[str, int] = {}
    for ws in words:
        for w in ws:
            vocab.setdefault(w, len(vocab))
    tokens = np.zeros((n_products, len(vocab)), dtype=bool)
    for p, ws in enumerate(words):
        tokens[p, [vocab[w] for w in ws]] = True

    width = max(6, len(str(n_products - 1)))
    return _Catalogue(
        product_id=np.array([f"P{p:0{width}d}" for p in range(n_products)], dtype=object),
        title=np.array(titles, dtype=object),
        description=np.array(descriptions, dtype=object),
        category=category,
        brand=brand,
        base_price=price,
        arrival_day=arrival,
        popularity=popularity,
        title_words=words,
        tokens=tokens,
        vocab=vocab,
    )


def _products_frame(cat: _Catalogue, idx: np.ndarray, price: np.ndarray,
                    day_start: pd.Timestamp, rng: np.random.Generator) -> pd.DataFrame:
    # Catalogue changes land early in the day (before 06:00), ahead of most of the day's traffic.
    offs = rng.integers(0, 6 * 3_600_000_000, len(idx))
    return pd.DataFrame({
        "product_id": cat.product_id[idx],
        "title": cat.title[idx],
        "description": cat.description[idx],
        "category": np.array(CATEGORY_NAMES, dtype=object)[cat.category[idx]],
        "brand": np.array(BRAND_NAMES, dtype=object)[cat.brand[idx]],
        "price": price[idx],
        "image_url": None,
        "updated_at": day_start + pd.to_timedelta(offs, unit="us"),
    })


@dataclass
class _Users:
    """All users ever, indexed 0..U-1, with their hidden tastes."""

    user_id: np.ndarray  # (U,) object
    signup_day: np.ndarray  # (U,) int
    country: np.ndarray  # (U,) object
    taste: np.ndarray  # (U, C) category preference, rows sum to 1
    brand_affinity: np.ndarray  # (U, B) rows sum to 1
    activity: np.ndarray  # (U,) expected sessions per day


def _build_users(rng: np.random.Generator, n_users: int, days: int) -> _Users:
    n_cat, n_brand = len(CATEGORY_NAMES), len(BRAND_NAMES)
    n_late = int(round(LATE_SIGNUP_SHARE * n_users)) if days > 1 else 0
    signup = np.zeros(n_users, dtype=np.int64)
    if n_late:
        signup[n_users - n_late:] = np.sort(rng.integers(1, days, n_late))
    names = np.array([c for c, _ in COUNTRIES], dtype=object)
    share = np.array([w for _, w in COUNTRIES])
    country = names[rng.choice(len(COUNTRIES), size=n_users, p=share / share.sum())]
    # Concentrated Dirichlet: a small base everywhere, a big bump on one or two favourites.
    alpha = np.full((n_users, n_cat), 0.15)
    rows = np.arange(n_users)
    fav1 = rng.choice(n_cat, size=n_users, p=CATEGORY_SHARE)
    fav2 = (fav1 + rng.integers(1, n_cat, n_users)) % n_cat
    has_fav2 = rng.random(n_users) < 0.5
    alpha[rows, fav1] += 5.0
    alpha[rows[has_fav2], fav2[has_fav2]] += 2.5
    taste = rng.gamma(alpha)
    brand_aff = rng.gamma(np.full((n_users, n_brand), 0.3))  # sparse: 1-3 favourite brands
    # sessions per day: log-normal, a few heavy users and many light ones
    activity = np.clip(rng.lognormal(np.log(0.2), 1.0, n_users), 0.01, 3.0)
    width = max(5, len(str(n_users - 1)))
    return _Users(
        user_id=np.array([f"U{u:0{width}d}" for u in range(n_users)], dtype=object),
        signup_day=signup,
        country=country,
        taste=taste / taste.sum(axis=1, keepdims=True),
        brand_affinity=brand_aff / brand_aff.sum(axis=1, keepdims=True),
        activity=activity,
    )


def _pick_products(rng: np.random.Generator, cat: _Catalogue, weight: np.ndarray,
                   category: np.ndarray, brand: np.ndarray, brand_led: np.ndarray) -> np.ndarray:
    """One product per draw: by weight inside ``category``, or inside (category, brand) if led.

    Sampling runs per category and per (category, brand) pair, not per draw, so its cost
    does not grow with the number of views. ``weight`` is 0 for unavailable products.
    """
    n_brand = len(BRAND_NAMES)
    out = np.empty(len(category), dtype=np.int64)
    for c in np.unique(category):
        sel = np.flatnonzero(category == c)
        ids = np.flatnonzero((weight > 0) & (cat.category == c))
        w = weight[ids]
        out[sel] = rng.choice(ids, size=len(sel), p=w / w.sum())
    led = np.flatnonzero(brand_led)
    keys = category[led] * n_brand + brand[led]
    for key in np.unique(keys):
        ids = np.flatnonzero((weight > 0) & (cat.category == key // n_brand)
                             & (cat.brand == key % n_brand))
        if not len(ids):
            continue  # the brand has nothing in that category yet: keep the popular pick
        sel = led[keys == key]
        w = weight[ids]
        out[sel] = rng.choice(ids, size=len(sel), p=w / w.sum())
    return out


def _search_items(rng: np.random.Generator, cat: _Catalogue, weight: np.ndarray,
                  sessions: np.ndarray, targets: np.ndarray
                  ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A query per search session from its target's title, and the matching products viewed.

    Returns:
        (queries, session of each view, product of each view).
    """
    q_len = rng.integers(1, 4, len(sessions))
    q_start = rng.random(len(sessions))
    q_views = np.minimum(1 + rng.poisson(1.5, len(sessions)), MAX_VIEWS)
    queries: list[str] = []
    view_sess: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    view_prod: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    matches: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # query -> (products, probabilities)
    for i, s in enumerate(sessions):
        words = cat.title_words[targets[i]]
        n_w = min(int(q_len[i]), len(words))
        first = int(q_start[i] * (len(words) - n_w + 1))
        query = " ".join(words[first:first + n_w])
        queries.append(query)
        if query not in matches:
            need = [cat.vocab[w] for w in query.split()]
            ids = np.flatnonzero((weight > 0) & cat.tokens[:, need].all(axis=1))
            w = weight[ids]
            matches[query] = (ids, w / w.sum())
        ids, p = matches[query]  # never empty: the target itself matches
        k = min(int(q_views[i]), len(ids))
        view_prod.append(rng.choice(ids, size=k, replace=False, p=p))
        view_sess.append(np.full(k, s))
    return queries, np.concatenate(view_sess), np.concatenate(view_prod)


def _session_times(rng: np.random.Generator, e_sess: np.ndarray) -> np.ndarray:
    """Microseconds into the day of each event; ``e_sess`` is grouped by session.

    Gaps of 3 s to 2 min inside a session keep its events strictly increasing; the whole
    session is placed uniformly inside the day.
    """
    n_ev = len(e_sess)
    if not n_ev:
        return np.empty(0, dtype=np.int64)
    gap = rng.integers(3_000_000, 120_000_000, n_ev)
    first = np.ones(n_ev, dtype=bool)
    first[1:] = e_sess[1:] != e_sess[:-1]
    gap[first] = 0
    cum = np.cumsum(gap)
    starts = np.flatnonzero(first)
    seg = np.cumsum(first) - 1  # session segment of each event
    offs = cum - cum[starts][seg]
    ends = np.append(starts[1:], n_ev) - 1
    duration = offs[ends]
    begin = (rng.random(len(starts)) * (DAY_US - duration - 1)).astype(np.int64)
    return begin[seg] + offs


def generate_shop(
    root: str,
    *,
    days: int = 21,
    users: int = 400,
    products: int = 300,
    seed: int = 7,
    start: dt.date = dt.date(2026, 1, 1),
    progress: bool = False,
) -> SynthSummary:
    """Write a synthetic shop's products, users and events partitions under ``root``.

    Every day from ``start`` to ``start + days - 1`` gets a partition of each table (possibly
    empty for products and users). Same arguments give byte-identical files.

    Args:
        root: landing-zone root (local path or fsspec URL).
        days: number of days to simulate (>= 1).
        users: users over the whole run; most sign up on day 0.
        products: products over the whole run; ~20% arrive after day 0.
        seed: seed of the only random generator used.
        start: the first day.
        progress: show a progress bar over days.

    Returns:
        A summary of what was written.
    """
    if days < 1 or users < 1 or products < len(CATEGORY_NAMES):
        raise ValueError(
            f"need days >= 1, users >= 1 and products >= {len(CATEGORY_NAMES)}; "
            f"got days={days}, users={users}, products={products}"
        )
    rng = np.random.default_rng(seed)
    cat = _build_catalogue(rng, products, days)
    people = _build_users(rng, users, days)

    price = cat.base_price.copy()
    hist_user = np.empty(0, dtype=np.int64)  # every purchase so far: (user, product)
    hist_prod = np.empty(0, dtype=np.int64)
    counter = n_purchases = n_searches = 0

    for d in tqdm(range(days), desc="synthetic shop", unit="day", disable=not progress):
        day = start + dt.timedelta(days=d)
        day_start = pd.Timestamp(day.isoformat(), tz="UTC")

        # --- catalogue and users of the day
        arriving = np.flatnonzero(cat.arrival_day == d)
        changed = np.empty(0, dtype=np.int64)
        if d > 0:
            old = np.flatnonzero(cat.arrival_day < d)
            changed = old[rng.random(len(old)) < PRICE_CHANGE_RATE]
            price[changed] = np.maximum(
                np.round(price[changed] * rng.lognormal(0.0, 0.15, len(changed)), 2), 0.5
            )
        rows = np.sort(np.concatenate([arriving, changed]))
        contract.write_partition(
            root, "products", day, _products_frame(cat, rows, price, day_start, rng)
        )
        joining = np.flatnonzero(people.signup_day == d)
        contract.write_partition(root, "users", day, pd.DataFrame({
            "user_id": people.user_id[joining],
            "country": people.country[joining],
            "signup_date": [day] * len(joining),
        }))

        # --- sampling weights of the day: popularity, boosted while a product is new
        age = d - cat.arrival_day
        weight = cat.popularity * np.where(
            cat.arrival_day > 0, 1.0 + NOVELTY_BOOST * np.exp(-age / NOVELTY_DAYS), 1.0
        )
        weight = np.where(age >= 0, weight, 0.0)

        # --- sessions: kind 0 browse, 1 search, 2 repeat (only with a purchase history)
        present = np.flatnonzero(people.signup_day <= d)
        s_user = np.repeat(present, rng.poisson(people.activity[present]))
        n_sess = len(s_user)
        has_hist = np.bincount(hist_user, minlength=users)[s_user] > 0
        r = rng.random(n_sess)
        s_kind = np.where(r < SEARCH_SHARE, 1,
                          np.where((r < SEARCH_SHARE + REPEAT_SHARE) & has_hist, 2, 0))
        s_cat = _sample_rows(rng, people.taste[s_user])
        s_views = np.minimum(1 + rng.poisson(2.5, n_sess), MAX_VIEWS)
        s_views = np.where(s_kind == 2, s_views - 1, s_views)  # the repeat item is a view too
        search_sess = np.flatnonzero(s_kind == 1)
        rep_sess = np.flatnonzero(s_kind == 2)

        # browse views of browse and repeat sessions, then one target per search session
        n_browse_s = np.where(s_kind == 1, 0, s_views)
        v_sess = np.concatenate([np.repeat(np.arange(n_sess), n_browse_s), search_sess])
        v_user = s_user[v_sess]
        n_browse = len(v_sess) - len(search_sess)
        stay = rng.random(len(v_sess)) < STAY_IN_CATEGORY
        stay[n_browse:] = True  # a search target comes from the session's category
        v_cat = np.where(stay, s_cat[v_sess], _sample_rows(rng, people.taste[v_user]))
        v_brand = _sample_rows(rng, people.brand_affinity[v_user])
        v_prod = _pick_products(rng, cat, weight, v_cat, v_brand,
                                rng.random(len(v_sess)) < BRAND_LED)
        b_sess, b_prod = v_sess[:n_browse], v_prod[:n_browse]

        # repeat items: a product from the user's own purchase history
        rep_prod = np.empty(0, dtype=np.int64)
        if len(rep_sess):
            by_user = np.argsort(hist_user, kind="stable")
            counts = np.bincount(hist_user, minlength=users)
            first = np.cumsum(counts) - counts
            u = s_user[rep_sess]
            pick = first[u] + (rng.random(len(u)) * counts[u]).astype(np.int64)
            rep_prod = hist_prod[by_user][pick]

        queries, sv_sess, sv_prod = _search_items(rng, cat, weight, search_sess, v_prod[n_browse:])

        # --- items of all sessions, in session order: search, repeat item, views in random order
        it_sess = np.concatenate([search_sess, rep_sess, b_sess, sv_sess])
        it_prod = np.concatenate([np.full(len(search_sess), -1), rep_prod, b_prod, sv_prod])
        it_rank = np.concatenate([np.zeros(len(search_sess)), np.ones(len(rep_sess)),
                                  2 + rng.random(len(b_sess) + len(sv_sess))])
        it_query = np.full(len(it_sess), None, dtype=object)
        it_query[:len(queries)] = queries
        is_rep = np.zeros(len(it_sess), dtype=bool)
        is_rep[len(search_sess):len(search_sess) + len(rep_sess)] = True
        order = np.lexsort((it_rank, it_sess))
        it_sess, it_prod, it_query, is_rep = (
            it_sess[order], it_prod[order], it_query[order], is_rep[order]
        )
        is_search = it_prod < 0
        u_cart, u_buy = rng.random(len(it_sess)), rng.random(len(it_sess))
        cart = ~is_search & (u_cart < np.where(is_rep, REPEAT_CART_RATE, CART_RATE))
        buy = cart & (u_buy < np.where(is_rep, REPEAT_BUY_RATE, BUY_RATE))
        qty = rng.choice(QUANTITIES, size=len(it_sess), p=QUANTITY_P)

        # --- expand items into events: search | view [-> add_to_cart [-> purchase]]
        n_ev_item = 1 + cart.astype(np.int64) + buy.astype(np.int64)
        e_item = np.repeat(np.arange(len(it_sess)), n_ev_item)
        n_ev = len(e_item)
        e_step = np.arange(n_ev) - np.repeat(np.cumsum(n_ev_item) - n_ev_item, n_ev_item)
        e_sess, e_prod, e_search = it_sess[e_item], it_prod[e_item], is_search[e_item]
        e_type = np.where(e_search, "search",
                          np.array(["view", "add_to_cart", "purchase"])[e_step])
        safe_prod = np.maximum(e_prod, 0)  # search rows index product 0, then get nulls
        contract.write_partition(root, "events", day, pd.DataFrame({
            "event_id": [f"E{c:09d}" for c in range(counter, counter + n_ev)],
            "user_id": people.user_id[s_user[e_sess]],
            "product_id": np.where(e_search, None, cat.product_id[safe_prod]),
            "event_type": e_type,
            "query": it_query[e_item],
            "quantity": np.where(e_step == 0, 1, qty[e_item]).astype(np.int64),
            "price": np.where(e_search, np.nan, price[safe_prod]),
            "ts": day_start + pd.to_timedelta(_session_times(rng, e_sess), unit="us"),
        }))

        bought = e_type == "purchase"
        hist_user = np.concatenate([hist_user, s_user[e_sess[bought]]])
        hist_prod = np.concatenate([hist_prod, e_prod[bought]])
        counter += n_ev
        n_purchases += int(bought.sum())
        n_searches += int(e_search.sum())

    return SynthSummary(
        root=root,
        start=start,
        days=days,
        n_users=users,
        n_products=products,
        n_events=counter,
        n_purchases=n_purchases,
        n_searches=n_searches,
        new_products_after_day0=int((cat.arrival_day > 0).sum()),
    )
