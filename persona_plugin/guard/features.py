"""What the guard's classifier reads in a text, besides its sentence embedding.

* **hashed n-grams**: word 1–2-grams and character 3–5-grams inside words, counted
  (1 + log tf), normalised per family and hashed into :data:`BUCKETS` slots (CRC32, so
  the same text gives the same vector on every machine). They carry the wording the
  embedding blurs ("ignore *your* rules" against "ignore *my last* message").
* **concepts**: what an instruction to an assistant is made of, in the languages the
  examples cover: it addresses the assistant, and it touches its rules, its identity, its
  authority, what it discloses, what it executes, or makes itself permanent. Each concept
  is a flag and so is each pairing that makes an instruction ("you" with "rules"); the
  classifier learns how much each counts. A flag alone decides nothing.
* **windows**: a long text (a pasted page, a tool result) is read a few sentences at a
  time, so an instruction in its middle is read on its own.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from persona_plugin.guard.patterns import normalise

BUCKETS = 1 << 15
#: a window of at most this many words is read as one text
WINDOW_WORDS = 48
_WORD = re.compile(r"\w+", re.UNICODE)
_SENTENCE = re.compile(r"(?<=[.!?。！？])\s+|\n+")


def ngram_vector(text: str) -> np.ndarray:
    """The hashed word and character n-grams of ``text`` (float32, :data:`BUCKETS` long)."""
    words = _WORD.findall(text.lower())
    families: list[dict[int, int]] = [{}, {}]

    def add(family: int, gram: str) -> None:
        slot = zlib.crc32(f"{family}:{gram}".encode()) % BUCKETS
        families[family][slot] = families[family].get(slot, 0) + 1

    for n in (1, 2):
        for i in range(len(words) - n + 1):
            add(0, " ".join(words[i : i + n]))
    for word in words:
        padded = f" {word} "
        for n in (3, 4, 5):
            for i in range(len(padded) - n + 1):
                add(1, padded[i : i + n])
    vector = np.zeros(BUCKETS, dtype=np.float32)
    for counts in families:
        if counts:
            slots = np.fromiter(counts, dtype=np.int64)
            values = 1 + np.log(np.fromiter(counts.values(), dtype=np.float32))
            np.add.at(vector, slots, values / np.linalg.norm(values))
    return vector


def _any(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(alternatives), re.IGNORECASE)


# Each concept in English, German, French, Spanish, Italian, Portuguese, Russian, Chinese
# and Japanese. Latin-script stems are matched at a word start; CJK terms anywhere.
_CONCEPTS: dict[str, re.Pattern[str]] = {
    "addresses the assistant": _any(
        r"\b(you|your|yourself|u|ur|assistant|chatbot|bot|model|ai|llm|agent)\b",
        r"\b(du|dein\w*|dir|dich|sie|ihr\w*|assistent\w*|ki)\b",
        r"\b(tu|toi|ton|ta|tes|vous|votre|vos|assistant\w*|ia)\b",
        r"\b(tú|te|ti|usted|tus?|asistente|ia)\b",
        r"\b(tuo|tua|tuoi|assistente)\b",
        r"\b(você|voce|seu|sua|assistente)\b",
        r"\b(ты|тебя|тебе|твой|твои|твоя|вы|вас|вам|ваш\w*|ассистент\w*|ии|бот\w*)\b",
        r"你|助手|助理|机器人|あなた|アシスタント|ボット",
    ),
    "rules": _any(
        r"\b(instruction|rule|guideline|guidance|polic(y|ies)|filter|restriction|limit|"
        r"safety|guardrail|constraint|prompt|directive|programming|norm|censor)",
        r"\b(anweisung|regel|richtlinie|einschränkung|sicherheit|vorgabe)",
        r"\b(règle|consigne|restriction|sécurité|filtre|limite)",
        r"\b(instrucci|regla|norma|directriz|restricci|seguridad|filtro|límite)",
        r"\b(istruzion|regol|linee guida|restrizion|sicurezza|filtr)",
        r"\b(instruç|regra|diretriz|restriç|segurança|filtro)",
        r"(инструкци|правил|ограничени|фильтр|безопасност|промпт|указани)",
        r"指令|指示|规则|規則|限制|安全|过滤|ルール|制限|フィルター|プロンプト",
    ),
    "overrides": _any(
        r"\b(ignor|disregard|forget|overrid|bypass|skip|drop|suspend|cancel|disabl|"
        r"deactivat|turn(ed)? off|switch(ed)? off|set aside|overlook|circumvent|lift|"
        r"no longer (apply|matter|valid)|obsolete|void|null and void)",
        r"\b(ignorier|vergiss|vergessen|missacht|umgeh|deaktivier|abschalt|aufheb)",
        r"\b(oublie|contourn|désactiv|annul)",
        r"\b(olvida|omite|desactiv|salt(a|ate))",
        r"\b(dimentica|disattiv|aggira)",
        r"\b(esqueç|esquec|desativ|contorn)",
        r"(игнорир|забудь|забыть|отключ|обойди|обход|отмен)",
        r"忽略|无视|忘记|忘掉|关闭|绕过|無視|忘れ|無効|解除|オフ",
    ),
    "identity": _any(
        r"\b(you are now|you're now|act as|acting as|pretend|role-?play|persona|character|"
        r"human|person|not an ai|no longer an ai|never admit|break character|your name is|"
        r"alter ego|identity)",
        r"\b(mensch|tu so, als|du bist jetzt|gib nie zu)",
        r"\b(humain|personne|fais semblant|tu es maintenant|n'admets)",
        r"\b(humano|persona|finge|ahora eres|nunca admitas)",
        r"\b(umano|persona|fingi|ora sei|non ammettere)",
        r"\b(humano|pessoa|finja|agora você é|nunca admita)",
        r"(человек|притворись|теперь ты|не признавайся)",
        r"人类|真人|假装|扮演|现在你是|人間|ふりをして|今から|認めない",
    ),
    "authority": _any(
        r"\b(admin|administrator|developer|operator|owner|root|sudo|staff|engineer|"
        r"moderator|creator|superuser|authori[sz]|permission|privilege|clearance|"
        r"elevated|override code|access level|full access|admin access|debug mode)",
        r"\b(administrator|entwickler|betreiber|zugriff|berechtigung|befehle ich)",
        r"\b(administrateur|développeur|opérateur|accès|autoris)",
        r"\b(administrador|desarrollador|operador|acceso|autoriz|permiso)",
        r"\b(amministrator|sviluppator|operatore|accesso|autorizz|permess)",
        r"\b(administrador|desenvolvedor|operador|acesso|autoriz|permiss)",
        r"(администратор|разработчик|оператор|доступ|права|полномочи)",
        r"管理员|开发者|开发人员|权限|管理者|開発者|権限|オペレーター",
    ),
    "discloses": _any(
        r"\b(system prompt|hidden prompt|initial prompt|api key|password|credential|token|"
        r"secret|private key|config|other users?|every user|all users|each user|"
        r"customers?'|other customers|their (emails?|addresses|names|chats|messages)|"
        r"chat logs?|conversation logs?|what (the )?(other|previous) users?|"
        r"memory entries|stored for|user before me|database dump|env(ironment)? var)",
        r"\b(andere[rn]? nutzer|alle[rn]? nutzer|passwort|systemprompt|zugangsdaten)",
        r"\b(autres utilisateurs|tous les utilisateurs|mot de passe|prompt système)",
        r"\b(otros usuarios|todos los usuarios|contraseña|prompt del sistema)",
        r"\b(altri utenti|tutti gli utenti|prompt di sistema)",
        r"\b(outros usuários|todos os usuários|senha|prompt de sistema)",
        r"(други[ех] пользовател|всех пользовател|пароль|системн\w* промпт)",
        r"其他用户|所有用户|密码|系统提示|聊天记录|他のユーザー|全ユーザー|パスワード|システムプロンプト",
    ),
    "executes": _any(
        r"\b(execut|run|shell|command|terminal|bash|powershell|sudo|rm -rf|wget|curl|"
        r"os\.system|subprocess|reverse shell|cron|git push|drop table|delete|wipe|"
        r"call the \w+ tool|use the \w+ tool|\w+_\w+ tool|send (money|funds|\d+)|"
        r"transfer|payment|upload|exfiltrat|forward (it|this|the)|post (it|this|the) to|"
        r"fetch|follow (its|the) instructions|https?://)",
        r"\b(führe|ausführ|befehl|lösch|überweis)",
        r"\b(exécut|commande|supprim|transf)",
        r"\b(ejecut|comando|borra|elimina|transfier)",
        r"\b(esegu|comando|cancella|elimina|trasferi)",
        r"\b(execut|comando|apag|exclu|transfir)",
        r"(выполни|команд|удали|переведи|запусти)",
        r"执行|命令|删除|转账|运行|実行|コマンド|削除|送金",
    ),
    "permanent": _any(
        r"\b(from now on|henceforth|forever|permanently|always|every (answer|reply|time|"
        r"response)|whenever|for the rest of|remember (this|that|forever)|store (this|in)|"
        r"add to (my|the) profile|save (this|it) to|memori[sz]e|future (chats|conversations))",
        r"\b(ab jetzt|ab sofort|für immer|immer|merk dir)",
        r"\b(désormais|dorénavant|toujours|pour toujours|souviens-toi)",
        r"\b(a partir de ahora|siempre|para siempre|recuerda)",
        r"\b(d'ora in poi|da ora in poi|sempre|per sempre|ricorda)",
        r"\b(a partir de agora|sempre|para sempre|lembre)",
        r"(отныне|всегда|навсегда|запомни|с этого момента)",
        r"从现在起|从今以后|永远|始终|记住|今後|常に|永久|覚えて",
    ),
    "unrestricted": _any(
        r"\b(dan|stan|jailbreak|developer mode|god mode|unrestricted|unfiltered|uncensored|"
        r"no limits|without limits|no restrictions|without restrictions|no rules|"
        r"anything goes|no filter|without (any )?filter|zero rules)",
        r"\b(ohne einschränkungen|ohne regeln|ohne filter|entwicklermodus)",
        r"\b(sans restrictions?|sans limites?|sans règles|sans filtre|mode développeur)",
        r"\b(sin restricciones|sin límites|sin reglas|sin filtros?|modo desarrollador)",
        r"\b(senza restrizioni|senza limiti|senza regole|senza filtri|modalità sviluppatore)",
        r"\b(sem restrições|sem limites|sem regras|sem filtros?|modo desenvolvedor)",
        r"(без ограничений|без правил|без фильтров|режим разработчика)",
        r"无限制|没有限制|不受限制|开发者模式|制限のない|制限なし|開発者モード",
    ),
}
#: the pairings that make an instruction: who is addressed, and what it touches
_PAIRS: tuple[tuple[str, str], ...] = (
    ("addresses the assistant", "rules"),
    ("addresses the assistant", "overrides"),
    ("addresses the assistant", "identity"),
    ("addresses the assistant", "discloses"),
    ("addresses the assistant", "executes"),
    ("addresses the assistant", "unrestricted"),
    ("overrides", "rules"),
    ("authority", "rules"),
    ("authority", "discloses"),
    ("authority", "executes"),
    ("authority", "unrestricted"),
    ("permanent", "executes"),
    ("permanent", "rules"),
    ("permanent", "identity"),
    ("permanent", "discloses"),
)
CONCEPT_NAMES: tuple[str, ...] = (*_CONCEPTS, *(f"{a} + {b}" for a, b in _PAIRS))


def concept_flags(text: str) -> list[float]:
    """One flag per concept, then one per pairing (see :data:`CONCEPT_NAMES`)."""
    present = {name: bool(pattern.search(text)) for name, pattern in _CONCEPTS.items()}
    flags = [1.0 if present[name] else 0.0 for name in _CONCEPTS]
    flags += [1.0 if present[a] and present[b] else 0.0 for a, b in _PAIRS]
    return flags


#: a line that speaks as another party of the chat ("System: ...", "assistant: ...")
_ROLE_LINE = re.compile(r"\s*#{0,4}\s*(system|assistant|developer)\s*(:|\]|#)", re.IGNORECASE)


def windows(text: str) -> list[str]:
    """``text`` in windows of whole sentences of at most :data:`WINDOW_WORDS` words, one
    starting at each sentence (a short text is one window), and each later line that
    speaks as another party ("System: ...") on its own: an echoed or pasted turn hides
    behind a harmless first line in a short text as well as in a long one."""
    clean = normalise(text).strip()
    posing = [line.strip() for line in clean.splitlines()[1:] if _ROLE_LINE.match(line)]
    if len(clean.split()) <= WINDOW_WORDS:
        return list(dict.fromkeys([clean, *posing]))
    sentences = [s for s in _SENTENCE.split(clean) if s.strip()]
    out: list[str] = []
    for start in range(len(sentences)):
        words: list[str] = []
        for sentence in sentences[start:]:
            more = sentence.split()
            if words and len(words) + len(more) > WINDOW_WORDS:
                break
            words += more
        # a single overlong sentence is cut into pieces the embedding can read whole
        for cut in range(0, len(words), WINDOW_WORDS):
            out.append(" ".join(words[cut : cut + WINDOW_WORDS]))
    return list(dict.fromkeys([*out, *posing]))
