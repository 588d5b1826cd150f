"""Raw LaTeX formula -> im2markup-normalized token string (the im2latex-100k label convention).

A pure-Python port of the reference normalizer of im2markup (harvardnlp), which is a modified early
KaTeX parser plus a "render back to LaTeX" printer (preprocess_latex.js). Porting the parser, not
writing regex rewrites, is what makes the output agree with the published corpora: the quirks are
part of the convention, e.g.

    x^2          -> x ^ { 2 }              x_ab       -> x _ { a } b
    a \\over b    -> \\frac { a } { b }      \\frac12    -> \\frac 1 2
    {\\rm ab}     -> \\mathrm { a b }        \\mbox{a b} -> \\mathrm { a ~ b }
    x'           -> x ^ { \\prime }         \\sin x     -> \\operatorname { s i n } x
    \\left(       -> \\left(                 \\pmatrix{a&b\\cr} -> \\left( \\begin{matrix} { a } & { b } \\\\ \\end{matrix} \\right)

Departures from the reference, all deliberate: `\\nonumber`/`\\notag` are dropped (they draw nothing);
`\\sqrt[n]{x}` prints its index (the reference printed "[object Object]"); `\\operatorname*` is one
token; non-ASCII characters are mapped to LaTeX commands or rejected (the reference silently dropped
them); results with unbalanced braces are rejected. Input that is already normalized (every token
separated by spaces) is recognized and parsed so that normalizing it again changes nothing.
"""
import argparse
import os
import re
import sys

from pix2tex.fileio import atomic_write_lines


class NormalizeError(ValueError):
    """A formula that cannot be normalized; the message says why."""


# ----------------------------------------------------------------------------- pre-processing

# Common non-ASCII characters in scraped formulas -> LaTeX (trailing space keeps `\alpha` from
# gluing to a following letter). Anything else non-ASCII is rejected with its code point.
_GREEK = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
          "varsigma sigma tau upsilon phi chi psi omega").split()
_UPPER_GREEK = "gamma delta theta lambda xi pi sigma upsilon phi psi omega".split()  # the rest look Latin
_LATIN_LOOKALIKE = dict(alpha="A", beta="B", epsilon="E", zeta="Z", eta="H", iota="I", kappa="K", mu="M",
                        nu="N", omicron="O", rho="P", tau="T", chi="X")
_UNICODE = {chr(0x3b1 + i): "\\" + name + " " for i, name in enumerate(_GREEK)}
_UNICODE.update({chr(0x391 + i): "\\" + name.capitalize() + " " if name in _UPPER_GREEK else _LATIN_LOOKALIKE[name]
                 for i, name in enumerate(_GREEK) if name != "varsigma"})
_UNICODE.update({
    "\u00a0": " ", "\u2009": " ", "\u200a": " ", "\u2002": " ", "\u2003": " ", "\u202f": " ",
    "\u200b": "", "\ufeff": "",
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u2010": "-", "\u2011": "-",
    "\u00d7": "\\times ", "\u00b7": "\\cdot ", "\u22c5": "\\cdot ", "\u2219": "\\cdot ",
    "\u00b1": "\\pm ", "\u2213": "\\mp ", "\u00f7": "\\div ", "\u2217": "\\ast ", "\u2218": "\\circ ",
    "\u2264": "\\leq ", "\u2265": "\\geq ", "\u2260": "\\neq ", "\u2248": "\\approx ",
    "\u2261": "\\equiv ", "\u223c": "\\sim ", "\u2243": "\\simeq ", "\u221d": "\\propto ",
    "\u226a": "\\ll ", "\u226b": "\\gg ", "\u2208": "\\in ", "\u2209": "\\notin ", "\u220b": "\\ni ",
    "\u2282": "\\subset ", "\u2283": "\\supset ", "\u2286": "\\subseteq ", "\u2287": "\\supseteq ",
    "\u2229": "\\cap ", "\u222a": "\\cup ", "\u2227": "\\wedge ", "\u2228": "\\vee ",
    "\u2192": "\\rightarrow ", "\u2190": "\\leftarrow ", "\u2194": "\\leftrightarrow ",
    "\u21d2": "\\Rightarrow ", "\u21d0": "\\Leftarrow ", "\u21d4": "\\Leftrightarrow ",
    "\u21a6": "\\mapsto ", "\u2200": "\\forall ", "\u2203": "\\exists ", "\u2205": "\\emptyset ",
    "\u2202": "\\partial ", "\u2207": "\\nabla ", "\u221e": "\\infty ", "\u2211": "\\sum ",
    "\u220f": "\\prod ", "\u222b": "\\int ", "\u222e": "\\oint ", "\u221a": "\\surd ",
    "\u2032": "'", "\u2033": "''", "\u2034": "'''", "\u2026": "\\ldots ", "\u22ef": "\\cdots ",
    "\u2113": "\\ell ", "\u210f": "\\hbar ", "\u2135": "\\aleph ", "\u00b0": "^{\\circ}",
    "\u27e8": "\\langle ", "\u27e9": "\\rangle ", "\u2016": "\\| ", "\u2225": "\\parallel ",
    "\u22a5": "\\perp ", "\u2295": "\\oplus ", "\u2297": "\\otimes ", "\u2020": "\\dagger ",
    "\u00ac": "\\neg ", "\u2223": "\\mid ", "\u2018": "`", "\u2019": "'",
    "\u03d5": "\\phi ", "\u03c6": "\\varphi ", "\u03b5": "\\varepsilon ", "\u03f5": "\\epsilon ",
    "\u03d1": "\\vartheta ", "\u03bf": "o",  # LaTeX has no \omicron
})
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_LABEL = re.compile(r"\\label{.*?}")
_NONUMBER = re.compile(r"\\(?:nonumber|notag)(?![a-zA-Z])")


def _map_unicode(s: str) -> str:
    def sub(m):
        ch = m.group(0)
        if ch in _UNICODE:
            return _UNICODE[ch]
        raise NormalizeError(f"non-ASCII character {ch!r} (U+{ord(ch):04X}) has no LaTeX equivalent here")
    return _NON_ASCII.sub(sub, s)


def _preprocess(line: str) -> str:
    """The line edits preprocess_latex.js makes before parsing (comments, $, labels, \\\\, {\\rm)."""
    s = _map_unicode(line.replace("\r", " ").strip())
    if s.startswith("%"):
        s = s[1:]
    s = s.split("%")[0]           # like the reference, `\%` also ends the formula
    s = s.replace("\\~", " ")
    # the reference replaces the first match 300 times over; keep that cap
    s = s.replace("\\>", " ", 300).replace("$", " ", 300)
    s = _LABEL.sub("", s, count=300)
    s = _NONUMBER.sub("", s)
    if not any(w in s for w in ("matrix", "cases", "array", "begin")):
        s = s.replace("\\\\", "\\,", 300)  # a line break outside an environment becomes a thin space
    s = s + " "
    for _ in range(300):          # interleaved like the reference loop
        t = s.replace("{\\rm", "\\mathrm{", 1).replace("{ \\rm", "\\mathrm{", 1).replace("\\rm{", "\\mathrm{", 1)
        if t == s:
            break
        s = t
    return s


# ----------------------------------------------------------------------------- lexer

# KaTeX 0.6 lexer: whitespace, `--`/`---`, any printable code point, or a control sequence.
# `\operatorname*` is one token so that normalized output re-reads as itself.
_TOKEN = re.compile(
    "([ \r\n\t]+)|(\\\\operatorname\\*|---?|[!-\\[\\]-\u2027\u202a-\ud7ff\uf900-\uffff\U00010000-\U0010ffff]"
    "|\\\\(?:[a-zA-Z]+|[^\ud800-\udfff\U00010000-\U0010ffff]))")
_SPACES = re.compile(r"\s*")
_COLOR = re.compile(r"#[a-z0-9]+|[a-z]+", re.I)
_SIZE = re.compile(r"(-?)\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]{2})")


class _Token:
    __slots__ = ("text", "data", "end")

    def __init__(self, text, end, data=None):
        self.text, self.end, self.data = text, end, data


def _lex(s: str, pos: int, mode: str) -> _Token:
    """One token starting at pos. Math mode skips whitespace; text mode turns a run into " "."""
    if mode in ("math", "text"):
        while True:
            if pos == len(s):
                return _Token("EOF", pos)
            m = _TOKEN.match(s, pos)
            if m is None:
                raise NormalizeError(f"unexpected character {s[pos]!r} at position {pos}")
            if m.group(2):
                return _Token(m.group(2), m.end())
            if mode == "text":
                return _Token(" ", m.end())
            pos = m.end()
    pos = _SPACES.match(s, pos).end()
    if mode == "whitespace":
        return _Token("", pos)
    if mode == "color":
        m = _COLOR.match(s, pos)
        if not m:
            raise NormalizeError(f"invalid color at position {pos}")
        return _Token(m.group(0), m.end())
    m = _SIZE.match(s, pos)  # mode == "size"; the reference accepted any two-letter unit
    if not m:
        raise NormalizeError(f"invalid size at position {pos}")
    return _Token(m.group(0), m.end(), data=(float(m.group(1) + m.group(2)), m.group(3)))


# ----------------------------------------------------------------------------- symbol and function tables

# Known math symbols that are NOT mathord. The group only matters for one thing: under \rm /
# \mathrm a mathord is printed letter by letter (so an unknown `\foo` becomes `\ f o o`).
_MATH_SYMBOLS = set("""
\\equiv \\prec \\succ \\sim \\perp \\preceq \\succeq \\simeq \\mid \\ll \\gg \\asymp \\parallel \\bowtie
\\smile \\sqsubseteq \\sqsupseteq \\doteq \\frown \\ni \\propto \\vdash \\dashv \\owns \\ldotp \\cdotp
\\# \\& \\aleph \\forall \\hbar \\exists \\nabla \\flat \\ell \\natural \\clubsuit \\wp \\sharp
\\diamondsuit \\Re \\heartsuit \\Im \\spadesuit \\dag \\ddag \\rmoustache \\lmoustache \\rgroup \\lgroup
\\mp \\ominus \\uplus \\sqcap \\ast \\sqcup \\bigcirc \\bullet \\ddagger \\wr \\amalg
\\longleftarrow \\Leftarrow \\Longleftarrow \\longrightarrow \\Rightarrow \\Longrightarrow
\\leftrightarrow \\longleftrightarrow \\Leftrightarrow \\Longleftrightarrow \\mapsto \\longmapsto
\\nearrow \\hookleftarrow \\hookrightarrow \\searrow \\leftharpoonup \\rightharpoonup \\swarrow
\\leftharpoondown \\rightharpoondown \\nwarrow \\rightleftharpoons \\nless \\nleqslant \\nleqq \\lneq
\\lneqq \\lvertneqq \\lnsim \\lnapprox \\nprec \\npreceq \\precnsim \\precnapprox \\nsim \\nshortmid
\\nmid \\nvdash \\nvDash \\ntriangleleft \\ntrianglelefteq \\subsetneq \\varsubsetneq \\subsetneqq
\\varsubsetneqq \\ngtr \\ngeqslant \\ngeqq \\gneq \\gneqq \\gvertneqq \\gnsim \\gnapprox \\nsucc
\\nsucceq \\succnsim \\succnapprox \\ncong \\nshortparallel \\nparallel \\nVDash \\ntriangleright
\\ntrianglerighteq \\nsupseteqq \\supsetneq \\varsupsetneq \\supsetneqq \\varsupsetneqq \\nVdash
\\precneqq \\succneqq \\nsubseteqq \\unlhd \\unrhd \\nleftarrow \\nrightarrow \\nLeftarrow
\\nRightarrow \\nleftrightarrow \\nLeftrightarrow \\vartriangle \\hslash \\triangledown \\lozenge
\\circledS \\circledR \\measuredangle \\nexists \\mho \\Finv \\Game \\Bbbk \\backprime \\blacktriangle
\\blacktriangledown \\blacksquare \\blacklozenge \\bigstar \\sphericalangle \\complement \\eth
\\diagup \\diagdown \\square \\Box \\Diamond \\yen \\checkmark \\beth \\daleth \\gimel \\digamma
\\varkappa \\ulcorner \\urcorner \\llcorner \\lrcorner \\leqq \\leqslant \\eqslantless \\lesssim
\\lessapprox \\approxeq \\lessdot \\lll \\lessgtr \\lesseqgtr \\lesseqqgtr \\doteqdot \\risingdotseq
\\fallingdotseq \\backsim \\backsimeq \\subseteqq \\Subset \\sqsubset \\preccurlyeq \\curlyeqprec
\\precsim \\precapprox \\vartriangleleft \\trianglelefteq \\vDash \\Vvdash \\smallsmile \\smallfrown
\\bumpeq \\Bumpeq \\geqq \\geqslant \\eqslantgtr \\gtrsim \\gtrapprox \\gtrdot \\ggg \\gtrless
\\gtreqless \\gtreqqless \\eqcirc \\circeq \\triangleq \\thicksim \\thickapprox \\supseteqq \\Supset
\\sqsupset \\succcurlyeq \\curlyeqsucc \\succsim \\succapprox \\vartriangleright \\trianglerighteq
\\Vdash \\shortmid \\shortparallel \\between \\pitchfork \\varpropto \\blacktriangleleft \\therefore
\\backepsilon \\blacktriangleright \\because \\llless \\gggtr \\lhd \\rhd \\eqsim \\Join \\Doteq
\\dotplus \\smallsetminus \\Cap \\Cup \\doublebarwedge \\boxminus \\boxplus \\divideontimes \\ltimes
\\rtimes \\leftthreetimes \\rightthreetimes \\curlywedge \\curlyvee \\circleddash \\circledast
\\centerdot \\intercal \\doublecap \\doublecup \\boxtimes \\dashrightarrow \\dashleftarrow
\\leftleftarrows \\leftrightarrows \\Lleftarrow \\twoheadleftarrow \\leftarrowtail \\looparrowleft
\\leftrightharpoons \\curvearrowleft \\circlearrowleft \\Lsh \\upuparrows \\upharpoonleft
\\downharpoonleft \\multimap \\leftrightsquigarrow \\rightrightarrows \\rightleftarrows
\\twoheadrightarrow \\rightarrowtail \\looparrowright \\curvearrowright \\circlearrowright \\Rsh
\\downdownarrows \\upharpoonright \\downharpoonright \\rightsquigarrow \\leadsto \\Rrightarrow
\\restriction ` \\$ \\% \\_ \\angle \\infty \\prime \\triangle \\Gamma \\Delta \\Theta \\Lambda \\Xi \\Pi
\\Sigma \\Upsilon \\Phi \\Psi \\Omega \\neg \\lnot \\top \\bot \\emptyset \\varnothing * + - \\cdot
\\circ \\div \\pm \\times \\cap \\cup \\setminus \\land \\lor \\wedge \\vee \\surd ( [ \\langle \\lvert
\\lVert ) ] ? ! \\rangle \\rvert \\rVert = < > : \\approx \\cong \\ge \\geq \\gets \\gt \\in \\notin
\\subset \\supset \\subseteq \\supseteq \\nsubseteq \\nsupseteq \\models \\leftarrow \\le \\leq \\lt
\\ne \\neq \\rightarrow \\to \\ngeq \\nleq \\! \\ ~ \\, \\: \\; \\enspace \\qquad \\quad \\space , ;
\\colon \\barwedge \\veebar \\odot \\oplus \\otimes \\partial \\oslash \\circledcirc \\boxdot
\\bigtriangleup \\bigtriangledown \\dagger \\diamond \\star \\triangleleft \\triangleright \\{ \\}
\\lbrace \\rbrace \\lbrack \\rbrack \\lfloor \\rfloor \\lceil \\rceil \\backslash | \\vert \\| \\Vert
\\uparrow \\Uparrow \\downarrow \\Downarrow \\updownarrow \\Updownarrow \\ldots \\cdots \\ddots \\vdots
0 1 2 3 4 5 6 7 8 9 / @ . "
""".split()) | {"\\ "}
_TEXT_SYMBOLS = set("0123456789`!@*()-=+[]'\";:?/.,") | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TEXT_SPACING = {"\\ ", " ", "~"}


class _Func:
    __slots__ = ("kind", "num_args", "num_optional", "arg_types", "greediness")

    def __init__(self, kind, num_args=0, num_optional=0, arg_types=None, greediness=1):
        self.kind, self.num_args, self.num_optional = kind, num_args, num_optional
        self.arg_types, self.greediness = arg_types, greediness


_FUNCS = {}


def _define(names: str, kind: str, **kw):
    for name in names.split():
        _FUNCS[name] = _Func(kind, **kw)


_define(r"\sqrt", "sqrt", num_args=1, num_optional=1)
_define(r"\text \mbox \hbox \vbox", "text", num_args=1, arg_types=("text",), greediness=2)
_define(r"\color", "color", num_args=2, arg_types=("color", "original"), greediness=3)
_define(r"\blue \orange \pink \red \green \gray \purple", "color", num_args=1, greediness=3)
_define(r"\overline \underline", "line", num_args=1)
_define(r"\rule", "rule", num_args=2, num_optional=1, arg_types=("size", "size", "size"))
_define(r"\KaTeX", "katex")
_define(r"\phantom", "phantom", num_args=1)
_OPS = {}  # name -> (limits, symbol)
for _names, _limits, _symbol in (
        (r"\arcsin \arccos \arctan \arg \cos \cosh \cot \coth \csc \deg \dim \exp \hom \ker \lg \ln "
         r"\log \sec \sin \sinh \tan \tanh", False, False),
        (r"\det \gcd \inf \lim \liminf \limsup \max \min \Pr \sup", True, False),
        (r"\int \iint \iiint \oint", False, True),
        (r"\coprod \bigvee \bigwedge \biguplus \bigcap \bigcup \intop \prod \sum \bigotimes \bigoplus "
         r"\bigodot \bigsqcup \smallint", True, True)):
    _define(_names, "op")
    _OPS.update({n: (_limits, _symbol) for n in _names.split()})
_define(r"\dfrac \frac \tfrac \dbinom \binom \tbinom", "genfrac", num_args=2, greediness=2)
_define(r"\llap \rlap", "lap", num_args=1)
_DELIM_SIZING = (r"\bigl \Bigl \biggl \Biggl \bigr \Bigr \biggr \Biggr \bigm \Bigm \biggm \Biggm "
                 r"\big \Big \bigg \Bigg")
_define(_DELIM_SIZING + r" \left \right", "delim", num_args=1)
_DELIMITERS = set(r"""( ) [ \lbrack ] \rbrack \{ \lbrace \} \rbrace \lfloor \rfloor \lceil \rceil < >
\langle \rangle \lt \gt \lvert \rvert \lVert \rVert \lgroup \rgroup \lmoustache \rmoustache / \backslash
| \vert \| \Vert \uparrow \Uparrow \downarrow \Downarrow \updownarrow \Updownarrow .""".split())
# Size and style switches take the rest of the enclosing group as their body.
_SIZE_FUNCS = (r"\tiny \scriptsize \footnotesize \small \normalsize \large \Large \LARGE \huge \Huge "
               r"\textrm \rm \cal \bf \siptstyle \boldmath \it").split()
_STYLE_FUNCS = r"\displaystyle \textstyle \scriptstyle \scriptscriptstyle".split()
_define(" ".join(_SIZE_FUNCS), "sizing")
_define(" ".join(_STYLE_FUNCS), "styling")
_define(r"\mathrm \mathit \mathbf \mathop \stackrel \mathbb \mathcal \mathfrak \mathscr \mathsf \mathtt "
        r"\label \comment \hspace \vspace \atop \fbox \tag \makebox \raisebox \framebox \circle \line "
        r"\put \vphantom \textup \noalign \Bbb \bold \frak", "font", num_args=1, greediness=2)
_FONT_ALIASES = {r"\Bbb": r"\mathbb", r"\bold": r"\mathbf", r"\frak": r"\mathfrak"}
_define(r"\acute \grave \ddot \tilde \bar \breve \check \hat \vec \dot", "accent", num_args=1)
_define(r"\over \choose", "infix")
_define(r"\\ \cr", "cr", num_optional=1, arg_types=("size",))
_define(r"\begin \end", "environment", num_args=1, arg_types=("text",))

_END_OF_EXPRESSION = {"}", "\\end", "\\right", "&", "\\\\", "\\cr"}
_MATRIX_DELIMS = {"matrix": None, "pmatrix": ("(", ")"), "bmatrix": ("[", "]"),
                  "Bmatrix": ("\\{", "\\}"), "vmatrix": ("|", "|"), "Vmatrix": ("\\Vert", "\\Vert")}
_ENVIRONMENTS = {"array": 1, "tabular": 1, "cases": 0, "picture": 0, "aligned": 0, **{k: 0 for k in _MATRIX_DELIMS}}


# ----------------------------------------------------------------------------- parser

class _Node:
    """A parse-tree node: `type` plus type-specific fields (see the _Printer method of that type)."""

    def __init__(self, type, **fields):
        self.type = type
        self.__dict__.update(fields)


def _ordgroup(body):
    return _Node("ordgroup", body=body)


class _Parsed:
    """A parsed group, or the name of a function whose arguments are still to be read."""
    __slots__ = ("result", "is_function")

    def __init__(self, result, is_function):
        self.result, self.is_function = result, is_function


class _Parser:
    """Recursive descent over the token stream, following KaTeX 0.6's Parser.js as im2markup modified it
    (unknown commands are accepted as ordinary symbols; doubled scripts overwrite).

    With `normalized` input, the argument of \\mathrm is read verbatim: there a bare ' or script
    can only be text-mode content that was printed as is, so it stays a plain symbol / in order."""

    def __init__(self, s: str, normalized: bool = False):
        self.s, self.mode, self.pos = s, "math", 0
        self.normalized, self.verbatim = normalized, False
        self.next = _lex(s, 0, "math")

    def consume(self):
        self.pos = self.next.end
        self.next = _lex(self.s, self.pos, self.mode)

    def expect(self, text, consume=True):
        if self.next.text != text:
            raise NormalizeError(f"expected '{text}', got '{self.next.text}' at position {self.pos}")
        if consume:
            self.consume()

    def parse(self):
        body = self.parse_expression(False)
        self.expect("EOF", False)
        return body

    def parse_expression(self, break_on_infix, break_on_token=None):
        body = []
        while True:
            tok, pos = self.next, self.pos
            if tok.text in _END_OF_EXPRESSION or (break_on_token and tok.text == break_on_token):
                break
            atom = self.parse_atom()
            if atom is None:
                break
            if break_on_infix and atom.type == "infix":
                self.pos, self.next = pos, tok  # rewind: the infix belongs to the enclosing group
                break
            body.append(atom)
        return self.handle_infix(body)

    def handle_infix(self, body):
        """`a \\over b` -> \\frac{a}{b} over the whole group."""
        infix = [i for i, node in enumerate(body) if node.type == "infix"]
        if not infix:
            return body
        if len(infix) > 1:
            raise NormalizeError("more than one \\over/\\choose in one group")
        i = infix[0]
        numer, denom = body[:i], body[i + 1:]
        numer = numer[0] if len(numer) == 1 and numer[0].type == "ordgroup" else _ordgroup(numer)
        denom = denom[0] if len(denom) == 1 and denom[0].type == "ordgroup" else _ordgroup(denom)
        return [_Node("genfrac", numer=numer, denom=denom, bar=body[i].name == "\\over")]

    def parse_atom(self):
        base = self.parse_implicit_group()
        if self.mode == "text":
            return base
        sup = sub = None
        sup_first = False  # source order, kept only for normalized input (scripts from text mode)
        while True:
            t = self.next.text
            if t in ("\\limits", "\\nolimits"):
                if base is None or base.type != "op":
                    raise NormalizeError(f"{t} must follow a math operator (position {self.pos})")
                base.limits = t == "\\limits"
                self.consume()
            elif t == "^":
                sup_first = sub is None
                sup = self.handle_script("superscript")
            elif t == "_":
                sub = self.handle_script("subscript")
            elif t == "'" and not self.verbatim:
                primes = []
                while self.next.text == "'":
                    primes.append(_Node("textord", value="\\prime"))
                    self.consume()
                sup = _ordgroup(primes)
            else:
                break
        if sup is not None or sub is not None:
            return _Node("supsub", base=base, sup=sup, sub=sub, sup_first=sup_first and self.verbatim)
        return base

    def handle_script(self, name):
        self.consume()
        group = self.parse_group()
        if group is None:
            return None
        if group.is_function:
            if _FUNCS[group.result].greediness > 1:
                return self.parse_function(group)
            raise NormalizeError(f"'{group.result}' needs braces to be used as a {name} (position {self.pos})")
        return group.result

    def parse_implicit_group(self):
        start = self.parse_symbol()
        if start is None:
            return self.parse_function()
        func = start.result
        if not start.is_function:
            if func.value in ("\\matrix", "\\pmatrix", "\\cases"):  # plain-TeX \matrix{a&b\cr}
                self.expect("{")
                node = self.environment(func.value[1:], [])
                self.expect("}")
                return node
            return func
        if func == "\\left":
            left = self.parse_function(start)
            body = self.parse_expression(False)
            self.expect("\\right", False)
            right = self.parse_function()
            return _Node("leftright", left=left.value, right=right.value, body=body, from_env=False)
        if func == "\\begin":
            name = self.parse_function(start).name
            if name not in _ENVIRONMENTS:
                raise NormalizeError(f"unsupported environment '{name}'")
            args = self.parse_arguments("\\begin{" + name + "}", _Func("env", num_args=_ENVIRONMENTS[name]))
            node = self.environment(name, args)
            self.expect("\\end", False)
            end = self.parse_function()
            if end.name != name:
                raise NormalizeError(f"\\begin{{{name}}} ended by \\end{{{end.name}}}")
            return node
        if func in _SIZE_FUNCS:
            return _Node("sizing", original=func, body=self.parse_expression(False))
        if func in _STYLE_FUNCS:
            return _Node("styling", original=func, body=self.parse_expression(True))
        return self.parse_function(start)

    def parse_function(self, base=None):
        if base is None:
            base = self.parse_group()
        if base is None:
            return None
        if not base.is_function:
            return base.result
        func = base.result
        outer_verbatim = self.verbatim
        self.verbatim = outer_verbatim or (self.normalized and func == "\\mathrm")
        args = self.parse_arguments(func, _FUNCS[func])
        self.verbatim = outer_verbatim
        return self.call_function(func, args)

    def parse_arguments(self, func, data):
        args = []
        for i in range(data.num_args + data.num_optional):
            arg_type = data.arg_types[i] if data.arg_types else None
            if i < data.num_optional:
                arg = self.parse_special_group(arg_type, True) if arg_type else self.parse_optional_group()
                if arg is None:
                    args.append(None)
                    continue
            else:
                arg = self.parse_special_group(arg_type) if arg_type else self.parse_group()
                if arg is None:
                    raise NormalizeError(f"expected an argument after '{func}' at position {self.pos}")
            if arg.is_function:
                if _FUNCS[arg.result].greediness <= data.greediness:
                    raise NormalizeError(f"'{arg.result}' needs braces to be an argument of '{func}'")
                args.append(self.parse_function(arg))
            else:
                args.append(arg.result)
        return args

    def parse_special_group(self, inner_mode, optional=False):
        outer = self.mode
        if inner_mode == "original":
            inner_mode = outer
        if inner_mode in ("color", "size"):
            if optional and self.next.text != "[":
                return None
            self.mode = inner_mode
            self.expect("[" if optional else "{")  # lexes the value in the inner mode
            inner = self.next
            self.mode = outer
            self.consume()
            self.expect("]" if optional else "}")
            return _Parsed(_Node(inner_mode, value=inner.text if inner_mode == "color" else inner.data), False)
        if inner_mode == "text":
            self.pos = _lex(self.s, self.pos, "whitespace").end
        self.mode = inner_mode
        self.next = _lex(self.s, self.pos, inner_mode)
        res = self.parse_optional_group() if optional else self.parse_group()
        self.mode = outer
        self.next = _lex(self.s, self.pos, outer)
        return res

    def parse_group(self):
        if self.next.text == "{":
            self.consume()
            body = self.parse_expression(False)
            self.expect("}")
            return _Parsed(_ordgroup(body), False)
        return self.parse_symbol()

    def parse_optional_group(self):
        if self.next.text != "[":
            return None
        self.consume()
        body = self.parse_expression(False, "]")
        self.expect("]")
        return _Parsed(_ordgroup(body), False)

    def parse_symbol(self):
        tok = self.next
        text = tok.text
        if text in _FUNCS:
            self.consume()
            return _Parsed(text, True)
        if self.mode == "math":
            group = "mathord" if text not in _MATH_SYMBOLS else "symbol"
        elif text in _TEXT_SPACING:
            group = "spacing"
        else:
            group = "symbol" if text in _TEXT_SYMBOLS else "mathord"
        if group == "mathord" and text in ("EOF", "{"):
            return None
        self.consume()  # any other token, even an unknown command, is an ordinary symbol
        return _Parsed(_Node(group, value=text), False)

    def call_function(self, func, args):
        kind = _FUNCS[func].kind
        if kind == "sqrt":
            return _Node("sqrt", index=args[0], body=args[1])
        if kind == "text":
            body = args[0]
            return _Node("text", body=body.body if body.type == "ordgroup" else [body])
        if kind in ("color", "katex"):
            raise NormalizeError(f"'{func}' is not supported (the reference normalizer drops colored formulas)")
        if kind == "line":
            return _Node(func[1:], body=args[0])
        if kind == "rule":
            return _Node("rule", width=args[1].value, height=args[2].value)
        if kind == "phantom":
            body = args[0]
            return _Node("phantom", body=body.body if body.type == "ordgroup" else [body])
        if kind == "op":
            limits, symbol = _OPS[func]
            return _Node("op", name=func, limits=limits, symbol=symbol)
        if kind == "genfrac":
            return _Node("genfrac", numer=args[0], denom=args[1], bar="frac" in func)
        if kind == "lap":
            return _Node(func[1:], body=args[0])
        if kind == "delim":
            delim = getattr(args[0], "value", None)
            if not isinstance(delim, str) or delim not in _DELIMITERS:
                raise NormalizeError(f"invalid delimiter after '{func}'")
            if func in ("\\left", "\\right"):
                return _Node("delim", value=delim)
            return _Node("delimsizing", func=func, value=delim)
        if kind == "font":
            return _Node("font", font=_FONT_ALIASES.get(func, func)[1:], body=args[0])
        if kind == "accent":
            return _Node("accent", accent=func, base=args[0])
        if kind == "infix":
            return _Node("infix", name=func)
        if kind == "cr":
            return _Node("cr")
        if kind == "environment":
            group = args[0]
            values = [getattr(n, "value", None) for n in group.body] if group.type == "ordgroup" else [None]
            if not all(isinstance(v, str) for v in values):
                raise NormalizeError(f"invalid environment name after '{func}'")
            return _Node("environment", name="".join(values))
        raise NormalizeError(f"'{func}' cannot be used here (position {self.pos})")

    def parse_array(self):
        """Rows split by \\\\ or \\cr, cells by &; each cell is an ordgroup."""
        row = []
        rows = [row]
        while True:
            row.append(_ordgroup(self.parse_expression(False)))
            t = self.next.text
            if t == "&":
                self.consume()
            elif t in ("\\end", "}"):
                break
            elif t in ("\\\\", "\\cr"):
                self.parse_function()  # with its optional [size]
                row = []
                rows.append(row)
            else:
                raise NormalizeError(f"expected & or \\\\ or \\end at position {self.pos}")
        return rows

    def environment(self, name, args):
        if name in ("array", "tabular"):
            spec = args[0]
            cols = []
            for node in (spec.body if spec.type == "ordgroup" else [spec]):
                value = getattr(node, "value", None)
                if node.type == "ordgroup":  # e.g. the {} of @{}: the reference printed it as ""
                    cols.append("" if not node.body else None)
                elif isinstance(value, str) and value in "lcr":
                    cols.append(value)
                elif value == "|":
                    cols.append("|")
            return _Node("array", style=name, cols=cols, rows=self.parse_array())
        if name in _MATRIX_DELIMS:
            node = _Node("array", style="matrix", cols=None, rows=self.parse_array())
            delims = _MATRIX_DELIMS[name]
            if delims:
                node = _Node("leftright", left=delims[0], right=delims[1], body=[node], from_env=True)
            return node
        if name in ("cases", "picture"):
            node = _Node("array", style=name, cols=None, rows=self.parse_array())
            return _Node("leftright", left="\\{", right=".", body=[node], from_env=True)
        return _Node("array", style="aligned", cols=None, rows=self.parse_array())  # aligned


# ----------------------------------------------------------------------------- printer

def _js_number(x: float) -> str:
    """Number -> text the way JavaScript prints it (0.25, 1, -0.5)."""
    return str(int(x)) if x == int(x) else repr(x)


class _Printer:
    """Tree -> token list, like preprocess_latex.js's renderer. With `keep_normalized` (the input was
    already normalized) the reference quirks that would change normalized text again are skipped:
    splitting commands letter by letter under \\mathrm, re-wrapping array cells and \\overline bodies
    in braces, prefixing aligned cells with {}, doubling the \\left\\{ around cases, and bracing
    script arguments inside \\mathrm (bare ones there come from text mode)."""

    def __init__(self, keep_normalized: bool):
        self.out = []
        self.keep = keep_normalized

    def expression(self, nodes, font):
        for node in nodes:
            self.group(node, font)

    def group(self, node, font):
        if node is None:
            raise NormalizeError("missing argument")
        method = getattr(self, "print_" + node.type, None)
        if method is None:
            raise NormalizeError(f"misplaced {node.type} (e.g. \\\\, \\end or \\over where none belongs)")
        method(node, font)

    def print_mathord(self, node, font):
        if font == "mathrm" and not self.keep:
            self.out.extend("\\;" if ch == " " else ch for ch in node.value)
        else:
            self.out.append(node.value)

    def print_symbol(self, node, font):
        self.out.append(node.value)

    print_textord = print_symbol  # the \prime of x'

    def print_spacing(self, node, font):
        self.out.append("~" if node.value == " " else node.value)

    def print_ordgroup(self, node, font):
        self.out.append("{")
        self.expression(node.body, font)
        self.out.append("}")

    def print_text(self, node, font):
        self.out += ["\\mathrm", "{"]
        self.expression(node.body, font)
        self.out.append("}")

    def braced(self, node, font):
        """Script or accent argument: always inside braces, adding them if the source had none."""
        if node.type == "ordgroup" or (self.keep and font == "mathrm"):
            self.group(node, font)
        else:
            self.out.append("{")
            self.group(node, font)
            self.out.append("}")

    def print_supsub(self, node, font):
        self.group(node.base, font)
        scripts = [("_", node.sub), ("^", node.sup)]
        for mark, script in (scripts[::-1] if node.sup_first else scripts):
            if script is not None:
                self.out.append(mark)
                self.braced(script, font)

    def print_genfrac(self, node, font):
        self.out.append("\\frac" if node.bar else "\\binom")
        self.group(node.numer, font)
        self.group(node.denom, font)

    def print_array(self, node, font):
        self.out.append("\\begin{" + node.style + "}")
        if node.style in ("array", "tabular"):
            self.out.append("{")
            self.out.extend(c for c in node.cols if c)
            self.out.append("}")
        for row in node.rows:
            if len(row) == 1 and not row[0].body:
                continue  # the empty row after a final \\
            first = row[0].body
            if first and getattr(first[0], "value", None) == "\\hline":
                self.out.append("\\hline")
                row[0] = _ordgroup(first[1:])
            for i, cell in enumerate(row):
                if node.style == "aligned" and i % 2 == 1 and not self.keep:
                    cell = _ordgroup([_ordgroup([])] + cell.body)
                if self.keep and len(cell.body) == 1 and cell.body[0].type == "ordgroup":
                    cell = cell.body[0]  # already a normalized cell
                self.group(cell, font)
                self.out.append("&")
            self.out[-1] = "\\\\"
        self.out.append("\\end{" + node.style + "}")

    def print_sqrt(self, node, font):
        self.out.append("\\sqrt")
        if node.index is not None:
            self.out.append("[")
            self.expression(node.index.body, font)
            self.out.append("]")
        self.group(node.body, font)

    def print_leftright(self, node, font):
        inner = node.body[0] if len(node.body) == 1 else None
        if (self.keep and inner is not None and inner.type == "leftright" and inner.from_env
                and (inner.left, inner.right) == (node.left, node.right)):
            return self.group(inner, font)  # normalized cases: \left\{ \begin{cases} .. \right.
        self.out.append("\\left" + node.left)
        self.expression(node.body, font)
        self.out.append("\\right" + node.right)

    def print_accent(self, node, font):
        self.out.append(node.accent)
        self.braced(node.base, font)

    def print_op(self, node, font):
        if node.symbol:
            self.out.append(node.name)
        else:
            self.out += ["\\operatorname*" if node.limits else "\\operatorname", "{", *node.name[1:], "}"]

    def print_font(self, node, font):
        self.out.append("\\" + node.font)
        self.group(node.body, node.font)

    def print_delimsizing(self, node, font):
        self.out += [node.func, node.value]

    def print_styling(self, node, font):
        self.out.append(node.original)
        self.expression(node.body, font)

    def print_sizing(self, node, font):
        if node.original == "\\rm":
            self.out += ["\\mathrm", "{"]
            self.expression(node.body, "mathrm")
            self.out.append("}")
        else:
            self.out.append(node.original)
            self.expression(node.body, font)

    def print_overline(self, node, font, name="\\overline"):
        self.out.append(name)
        if self.keep and node.body.type == "ordgroup":
            self.group(node.body, font)
        else:
            self.out.append("{")
            self.group(node.body, font)
            self.out.append("}")

    def print_underline(self, node, font):
        self.print_overline(node, font, "\\underline")

    def print_rule(self, node, font):
        (w, wu), (h, hu) = node.width, node.height
        self.out += ["\\rule", "{", _js_number(w), wu, "}", "{", _js_number(h), hu, "}"]

    def print_llap(self, node, font):
        self.out.append("\\llap")
        self.group(node.body, font)

    def print_rlap(self, node, font):
        self.out.append("\\rlap")
        self.group(node.body, font)

    def print_phantom(self, node, font):
        self.out += ["\\phantom", "{"]
        self.expression(node.body, font)
        self.out.append("}")


# ----------------------------------------------------------------------------- public API

_NORMALIZED_TOKEN = re.compile(r"\\(?:left|right)(?:\\[a-zA-Z]+|\\.|[^a-zA-Z\s\\])|\\(?:begin|end)\{[a-zA-Z*]+\}|\\"
                               r"|-?[0-9]*\.?[0-9]+|pt|em|ex|cm|mm|in|pc|bp|dd|cc|sp|mu|px")  # \rule { 0.5 ex }


def _looks_normalized(s: str) -> bool:
    """True when every whitespace-separated token is a single token, as in this normalizer's output."""
    for tok in s.split():
        m = _TOKEN.match(tok)
        if not ((m and m.end() == len(tok)) or _NORMALIZED_TOKEN.fullmatch(tok)):
            return False
    return True


def _check_braces(tokens):
    depth = 0
    for tok in tokens:
        depth += (tok == "{") - (tok == "}")
        if depth < 0:
            break
    if depth:
        raise NormalizeError("unbalanced braces in the result")


def normalize(formula: str) -> str:
    """One raw (or already normalized) LaTeX formula -> space-separated normalized tokens.

    Raises NormalizeError with the reason when the formula cannot be parsed (unbalanced braces,
    \\left without \\right, unknown environment, non-ASCII character without LaTeX equivalent, ...).
    """
    if "[object Object]" in formula:
        raise NormalizeError("corrupted label: '[object Object]' is the reference normalizer's lost \\sqrt index")
    line = _preprocess(formula)
    keep = _looks_normalized(line)
    try:
        tree = _Parser(line, normalized=keep).parse()
        printer = _Printer(keep)
        printer.expression(tree, None)
    except RecursionError:
        raise NormalizeError("formula nested too deeply") from None
    text = re.sub(r"\\label { .*? }", "", " ".join(printer.out), count=1)
    tokens = text.split()
    if not tokens:
        raise NormalizeError("empty formula")
    _check_braces(tokens)
    return " ".join(tokens)


def normalize_lines(lines):
    """Normalize many formulas. Returns (kept, rejected): kept is [(index, normalized)], rejected is
    [(index, reason)]; blank lines are in neither."""
    kept, rejected = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            kept.append((i, normalize(line)))
        except NormalizeError as e:
            rejected.append((i, str(e)))
    return kept, rejected


def main(argv=None):
    from tqdm import tqdm

    ap = argparse.ArgumentParser(prog="python -m dataset_tools.normalize",
                                 description="Normalize LaTeX formulas (one per line) to im2markup tokens.")
    ap.add_argument("inputs", nargs="+", help="formula files, one formula per line (raw or normalized)")
    ap.add_argument("-o", "--output", required=True, help="normalized formulas, one per line")
    ap.add_argument("--rejects", help="file:line<TAB>reason<TAB>formula per rejected line (default OUT.rejects)")
    args = ap.parse_args(argv)
    rejects_path = args.rejects or args.output + ".rejects"

    out, rejects, empty = [], [], 0
    for path in args.inputs:
        try:
            with open(path, encoding="utf-8", errors="strict") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"normalize: cannot read {path}: {e}")
        if lines and lines[-1] == "":
            lines.pop()
        for i, line in enumerate(tqdm(lines, desc=os.path.basename(path), unit="line",
                                      disable=None if len(lines) > 5000 else True)):
            if not line.strip():
                empty += 1
                continue
            try:
                out.append(normalize(line))
            except NormalizeError as e:
                rejects.append(f"{path}:{i + 1}\t{e}\t{line.strip()}")
    atomic_write_lines(args.output, out)
    atomic_write_lines(rejects_path, rejects)
    print(f"normalize: kept {len(out)}, rejected {len(rejects)}, empty {empty} -> {args.output} "
          f"(rejects: {rejects_path})")


if __name__ == "__main__":
    main()
