"""A seeded generator of a noisy multilingual Southeast-Asian e-commerce corpus (no downloads).

Seven markets, each a language and a currency: Indonesian (Rp), Thai (฿), Vietnamese (₫), Malay (RM),
Filipino (₱), Brazilian Portuguese (R$) and Singapore English (S$). Documents are product listings,
reviews, search queries, customer-service dialogues and general (non-commerce) text. Noise follows
real marketplace listings: shouting caps, adjacent-letter typos, emoji, English words mixed into
local titles, and the same quantity written as ``500ml`` / ``500 mL`` / ``0.5L``.

Everything is drawn from one ``random.Random(seed)``: the same ``CorpusConfig`` gives the same
documents, byte for byte, on every machine and Python >= 3.8.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LANGS = ("id", "th", "vi", "ms", "fil", "pt", "en")
DOC_KINDS = ("listing", "review", "query", "dialogue", "general")


@dataclass(frozen=True)
class Currency:
    """How one currency is written: symbol, decimals, separators and a fixed synthetic rate to USD."""
    code: str
    symbol: str
    decimals: int        # shown in prices: 0 for Rp and ₫ (no cents in practice), 2 elsewhere
    per_usd: float       # fixed synthetic rate, so price-conversion answers are reproducible
    thousands: str
    decimal: str
    suffix: bool = False  # ₫ is written after the number


CURRENCIES = {
    "IDR": Currency("IDR", "Rp", 0, 16000.0, ".", ","),
    "THB": Currency("THB", "฿", 2, 36.0, ",", "."),
    "VND": Currency("VND", "₫", 0, 25000.0, ".", ",", suffix=True),
    "MYR": Currency("MYR", "RM", 2, 4.5, ",", "."),
    "PHP": Currency("PHP", "₱", 2, 56.0, ",", "."),
    "BRL": Currency("BRL", "R$", 2, 5.0, ".", ","),
    "SGD": Currency("SGD", "S$", 2, 1.35, ",", "."),
}
LANG_CURRENCY = {"id": "IDR", "th": "THB", "vi": "VND", "ms": "MYR", "fil": "PHP", "pt": "BRL", "en": "SGD"}
# typical price of a USD-1 item is scaled by the rate; ranges in USD per category below

# category -> (USD price range, {lang: noun}); nouns are the local marketplace words
CATEGORIES = {
    "phone": ((80, 900), {"id": "HP", "th": "โทรศัพท์มือถือ", "vi": "điện thoại", "ms": "telefon pintar",
                          "fil": "cellphone", "pt": "celular", "en": "smartphone"}),
    "shoes": ((10, 120), {"id": "sepatu", "th": "รองเท้า", "vi": "giày", "ms": "kasut",
                          "fil": "sapatos", "pt": "tênis", "en": "sneakers"}),
    "skincare": ((3, 60), {"id": "serum wajah", "th": "เซรั่มบำรุงผิว", "vi": "serum dưỡng da", "ms": "serum muka",
                           "fil": "facial serum", "pt": "sérum facial", "en": "face serum"}),
    "snack": ((1, 15), {"id": "keripik", "th": "ขนมขบเคี้ยว", "vi": "bánh snack", "ms": "kerepek",
                        "fil": "chichirya", "pt": "salgadinho", "en": "chips"}),
    "beverage": ((1, 20), {"id": "kopi susu", "th": "ชาเขียว", "vi": "cà phê sữa", "ms": "teh tarik",
                           "fil": "kape", "pt": "café", "en": "iced coffee"}),
    "baby": ((5, 80), {"id": "popok bayi", "th": "ผ้าอ้อมเด็ก", "vi": "tã em bé", "ms": "lampin bayi",
                       "fil": "diaper", "pt": "fralda", "en": "baby diapers"}),
    "home": ((8, 200), {"id": "rice cooker", "th": "หม้อหุงข้าว", "vi": "nồi cơm điện", "ms": "periuk nasi",
                        "fil": "rice cooker", "pt": "panela elétrica", "en": "rice cooker"}),
}
# category -> (unit family, values); unit families render inconsistently (see format_size)
SIZES = {
    "phone": ("GB", (64, 128, 256, 512)), "shoes": ("EU", (38, 39, 40, 41, 42, 43, 44)),
    "skincare": ("ml", (15, 30, 50, 100)), "snack": ("g", (50, 100, 250, 500)),
    "beverage": ("ml", (250, 330, 500, 1000)), "baby": ("pcs", (20, 40, 60)), "home": ("L", (1, 2, 3)),
}
BRANDS = ("Samsung", "Xiaomi", "Wardah", "Somethinc", "Indomie", "Nestlé", "Philips", "Vinamilk",
          "Bata", "Havaianas", "Mamypoko", "Sharp", "Oppo", "Skintific", "Garuda", "Milo")
COLORS = {
    "id": ("hitam", "putih", "merah", "biru", "hijau"), "th": ("ดำ", "ขาว", "แดง", "น้ำเงิน", "เขียว"),
    "vi": ("đen", "trắng", "đỏ", "xanh dương", "xanh lá"), "ms": ("hitam", "putih", "merah", "biru", "hijau"),
    "fil": ("itim", "puti", "pula", "asul", "berde"), "pt": ("preto", "branco", "vermelho", "azul", "verde"),
    "en": ("black", "white", "red", "blue", "green"),
}
EMOJI = ("🔥", "✨", "💯", "🛒", "⭐", "😍", "🎁", "⚡", "👍", "🇮🇩", "🇹🇭", "🇻🇳")
PROMO = {
    "id": ("PROMO", "Gratis Ongkir", "ORI 100%", "Termurah"), "th": ("ส่งฟรี", "ของแท้", "ลดราคา", "SALE"),
    "vi": ("Freeship", "Chính hãng", "Giảm giá", "HOT"), "ms": ("Murah", "Penghantaran Percuma", "ORI", "SALE"),
    "fil": ("Sulit", "Free Shipping", "Legit", "SALE"), "pt": ("Frete Grátis", "Original", "Promoção", "Oferta"),
    "en": ("Free Delivery", "Authentic", "Best Seller", "SALE"),
}
REVIEWS = {
    "id": ("Barang sesuai deskripsi, pengiriman cepat", "Kualitas kurang bagus, agak kecewa", "Mantap gan, recommended seller"),
    "th": ("สินค้าตรงปก ส่งไวมาก", "คุณภาพไม่ค่อยดี ผิดหวังนิดหน่อย", "ดีมากค่ะ จะกลับมาซื้ออีก"),
    "vi": ("Hàng đúng mô tả, giao nhanh", "Chất lượng không tốt lắm, hơi thất vọng", "Sản phẩm tuyệt vời, sẽ ủng hộ tiếp"),
    "ms": ("Barang sampai cepat, seller responsif", "Kualiti kurang memuaskan", "Terbaik, memang berbaloi"),
    "fil": ("Ang ganda po, mabilis dumating", "Medyo sira yung packaging", "Sulit na sulit, order ulit ako"),
    "pt": ("Produto conforme o anúncio, chegou rápido", "Qualidade ruim, fiquei decepcionado", "Ótimo, recomendo"),
    "en": ("Item as described, fast shipping", "Quality is not great, a bit disappointed", "Excellent, will buy again"),
}
DIALOGUE = {
    "id": ("Kak, pesanan saya belum sampai.", "Mohon maaf kak, kami cek nomor resinya dulu ya."),
    "th": ("สินค้ายังไม่มาส่งเลยค่ะ", "ขออภัยค่ะ ขอเลขพัสดุเพื่อตรวจสอบนะคะ"),
    "vi": ("Shop ơi, đơn của mình chưa tới.", "Dạ shop xin lỗi, bạn gửi mã vận đơn giúp shop nhé."),
    "ms": ("Boss, parcel saya belum sampai lagi.", "Maaf ya, boleh beri nombor tracking?"),
    "fil": ("Hello po, hindi pa dumarating yung order ko.", "Pasensya na po, pakibigay ang tracking number."),
    "pt": ("Olá, meu pedido ainda não chegou.", "Desculpe, pode enviar o código de rastreio?"),
    "en": ("Hi, my order hasn't arrived yet.", "Sorry about that, could you share the tracking number?"),
}
GENERAL = {
    "id": ("Jakarta adalah ibu kota Indonesia.", "Hujan turun sejak pagi di Bandung.", "Nasi goreng adalah makanan populer."),
    "th": ("กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย", "วันนี้ฝนตกหนักตั้งแต่เช้า", "ต้มยำกุ้งเป็นอาหารที่มีชื่อเสียง"),
    "vi": ("Hà Nội là thủ đô của Việt Nam.", "Hôm nay trời mưa từ sáng sớm.", "Phở là món ăn nổi tiếng."),
    "ms": ("Kuala Lumpur ialah ibu negara Malaysia.", "Hujan lebat sejak pagi tadi.", "Nasi lemak ialah hidangan popular."),
    "fil": ("Ang Maynila ang kabisera ng Pilipinas.", "Umuulan na simula kaninang umaga.", "Masarap ang adobo."),
    "pt": ("Brasília é a capital do Brasil.", "Choveu muito desde cedo.", "A feijoada é um prato famoso."),
    "en": ("Singapore is a city-state in Southeast Asia.", "It has been raining since morning.", "Water boils at 100 degrees Celsius."),
}
QUERY_WORDS = {"id": "murah", "th": "ราคาถูก", "vi": "giá rẻ", "ms": "murah", "fil": "mura", "pt": "barato", "en": "cheap"}


@dataclass(frozen=True)
class Product:
    """One listing's ground truth; ``price`` is in ``currency`` units, rounded to its decimals."""
    pid: str
    lang: str
    category: str
    brand: str
    color: str
    size: int
    unit: str
    price: float
    currency: str

    @property
    def noun(self) -> str:
        """The product's category noun in its listing language."""
        return CATEGORIES[self.category][1][self.lang]


def format_amount(amount: float, currency: str) -> str:
    """Locale-style number with the currency symbol: ``Rp 125.000``, ``฿1,290.00``, ``125.000₫``, ``R$ 89,90``."""
    c = CURRENCIES[currency]
    s = f"{amount:,.{c.decimals}f}"                                  # 1,234.50
    s = s.replace(",", "\0").replace(".", c.decimal).replace("\0", c.thousands)
    if c.suffix:
        return f"{s}{c.symbol}"
    return f"{c.symbol} {s}" if c.symbol in ("Rp", "R$") else f"{c.symbol}{s}"


def round_price(amount: float, currency: str) -> float:
    """``amount`` rounded to the decimals the currency shows."""
    return round(amount, CURRENCIES[currency].decimals)


def format_size(rng: random.Random, size: int, unit: str) -> str:
    """The same quantity written the ways sellers write it (inconsistent units are part of the noise)."""
    if unit == "ml" and size >= 500 and rng.random() < 0.4:
        return f"{size / 1000:g}{rng.choice(('L', 'l', ' liter'))}"
    if unit == "g" and size >= 250 and rng.random() < 0.4:
        return f"{size / 1000:g}{rng.choice(('kg', ' KG'))}"
    if unit == "EU":
        return rng.choice((f"size {size}", f"EU{size}", f"no.{size}"))
    return rng.choice((f"{size}{unit}", f"{size} {unit}", f"{size}{unit.upper()}"))


def make_product(rng: random.Random, lang: str, idx: int = 0) -> Product:
    """A random product for a listing in ``lang`` (category, price in the local currency, size, brand, id)."""
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; expected one of {LANGS}")
    category = rng.choice(tuple(CATEGORIES))
    (lo, hi), _ = CATEGORIES[category]
    currency = LANG_CURRENCY[lang]
    usd = rng.uniform(lo, hi)
    price = usd * CURRENCIES[currency].per_usd
    # marketplace-style prices: 1,290 / 89.90 / 125,000
    step = 1000 if currency in ("IDR", "VND") else 1
    price = max(step, round(price / step) * step) - (0.1 if CURRENCIES[currency].decimals and rng.random() < 0.5 else 0)
    unit, sizes = SIZES[category]
    return Product(pid=f"{lang.upper()}-{idx:05d}", lang=lang, category=category, brand=rng.choice(BRANDS),
                   color=rng.choice(COLORS[lang]), size=rng.choice(sizes), unit=unit,
                   price=round_price(price, currency), currency=currency)


def typo(rng: random.Random, word: str) -> str:
    """Swap two adjacent letters (the most common listing typo); words of < 4 characters are kept."""
    if len(word) < 4:
        return word
    i = rng.randrange(len(word) - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def noisy(rng: random.Random, text: str, p: float) -> str:
    """Typos, caps and emoji, each with probability ``p``; ``p = 0`` returns ``text`` unchanged."""
    if p <= 0:
        return text
    words = [typo(rng, w) if rng.random() < p / 2 else w for w in text.split(" ")]
    text = " ".join(words)
    if rng.random() < p:
        text = text.upper()
    if rng.random() < p:
        text = f"{rng.choice(EMOJI)} {text} {rng.choice(EMOJI)}"
    return text


def listing_title(rng: random.Random, p: Product, noise: float) -> str:
    """``[PROMO] Brand noun color size`` with noise; the brand and size survive noise unchanged so
    that extraction answers stay checkable (typos hit only the noun and promo words)."""
    promo = rng.choice(PROMO[p.lang])
    noun = noisy(rng, p.noun, noise)
    # English words in local titles (mixed scripts): "NEW", "Original", "ready stock"
    extra = rng.choice(("", "NEW", "Ready Stock", "Original")) if rng.random() < noise else ""
    parts = [f"[{promo}]", p.brand, noun, p.color, format_size(rng, p.size, p.unit), extra]
    return " ".join(x for x in parts if x)


def listing_text(rng: random.Random, p: Product, noise: float) -> str:
    """A marketplace listing: the (noisy) title, then the price and the product id."""
    title = listing_title(rng, p, noise)
    return f"{title}\n{format_amount(p.price, p.currency)} | {p.pid}"


@dataclass(frozen=True)
class CorpusConfig:
    """What ``generate_corpus`` draws. ``general_fraction`` of documents are non-commerce text."""
    seed: int = 0
    n_docs: int = 200
    langs: tuple = LANGS
    noise: float = 0.3
    general_fraction: float = 0.2

    def __post_init__(self):
        if self.n_docs < 0:
            raise ValueError(f"n_docs must be >= 0, got {self.n_docs}")
        bad = [x for x in self.langs if x not in LANGS]
        if bad or not self.langs:
            raise ValueError(f"langs must be a non-empty subset of {LANGS}, got {self.langs}")
        object.__setattr__(self, "langs", tuple(self.langs))
        for name in ("noise", "general_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")


def make_document(rng: random.Random, lang: str, kind: str, noise: float, idx: int = 0) -> str:
    """One corpus document of ``kind`` (general text, listing, review, ...) in ``lang``."""
    if kind == "general":
        return " ".join(rng.sample(GENERAL[lang], k=rng.randint(1, len(GENERAL[lang]))))
    p = make_product(rng, lang, idx)
    if kind == "listing":
        return listing_text(rng, p, noise)
    if kind == "review":
        stars = rng.randint(1, 5)
        return f"{'⭐' * stars} {noisy(rng, REVIEWS[lang][rng.randrange(3)], noise)} — {p.brand} {p.noun}"
    if kind == "query":
        return noisy(rng, f"{p.noun} {p.brand.lower()} {QUERY_WORDS[lang]} {format_size(rng, p.size, p.unit)}", noise)
    if kind == "dialogue":
        user, agent = DIALOGUE[lang]
        return f"User: {noisy(rng, user, noise)} ({p.pid})\nAgent: {agent}"
    raise ValueError(f"unknown document kind {kind!r}; expected one of {DOC_KINDS}")


def generate_corpus(cfg: CorpusConfig = CorpusConfig()) -> list:
    """``cfg.n_docs`` dicts ``{"text", "lang", "kind", "domain"}``; languages cycle so every one of
    ``cfg.langs`` appears once ``n_docs >= len(langs)``; ``domain`` is ``general`` or ``ecommerce``."""
    rng = random.Random(cfg.seed)
    docs = []
    for i in range(cfg.n_docs):
        lang = cfg.langs[i % len(cfg.langs)]
        kind = "general" if rng.random() < cfg.general_fraction else rng.choice(DOC_KINDS[:-1])
        docs.append({"text": make_document(rng, lang, kind, cfg.noise, i), "lang": lang, "kind": kind,
                     "domain": "general" if kind == "general" else "ecommerce"})
    return docs
