//! The rule model: what a policy says, as data. The host (`cella-policies`) loads rule packs from
//! TOML, validates them and serializes a [`Policy`] as JSON; the guest deserializes it and builds
//! an [`Engine`](crate::Engine) from it.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Version of the serialized [`Policy`] format. Bumped on any incompatible change.
pub const POLICY_FORMAT_VERSION: u32 = 1;

/// A complete, validated set of rules, in the order the packs listed them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// [`POLICY_FORMAT_VERSION`] of the producer.
    pub format_version: u32,
    /// The rules; a rule's index here is its SARIF `ruleIndex`.
    pub rules: Vec<Rule>,
}

/// What kind of finding a rule produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    /// Credentials, keys, tokens.
    Secret,
    /// Personal data: card numbers, national identifiers, contact details.
    Pii,
    /// License identifiers and license texts.
    License,
}

impl Category {
    /// The lowercase name used in packs, SARIF properties and the summary.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Secret => "secret",
            Category::Pii => "pii",
            Category::License => "license",
        }
    }
}

/// How serious a finding is; maps onto SARIF `level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// SARIF `error`.
    Error,
    /// SARIF `warning`.
    Warning,
    /// SARIF `note`.
    Note,
}

impl Severity {
    /// The SARIF `level` value.
    pub fn sarif_level(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        }
    }

    /// The more serious of `self` and `floor`.
    pub fn at_least(self, floor: Severity) -> Severity {
        let rank = |s: Severity| match s {
            Severity::Note => 0,
            Severity::Warning => 1,
            Severity::Error => 2,
        };
        if rank(floor) > rank(self) {
            floor
        } else {
            self
        }
    }
}

/// How sure a finding is to be what its rule says: a token of a provider's own format is a
/// secret; a high-entropy value assigned to a secret-sounding name may be one; an e-mail
/// address is personal data only perhaps. The default CI gate counts `high` and `medium`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Confidence {
    Low,
    Medium,
    High,
}

impl Confidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Confidence::Low => "low",
            Confidence::Medium => "medium",
            Confidence::High => "high",
        }
    }

    /// One step lower (`low` stays `low`).
    pub fn lowered(self) -> Confidence {
        match self {
            Confidence::High => Confidence::Medium,
            _ => Confidence::Low,
        }
    }

    /// SARIF `rank` (0–100: how much a result matters).
    pub fn sarif_rank(self) -> f64 {
        match self {
            Confidence::High => 90.0,
            Confidence::Medium => 60.0,
            Confidence::Low => 30.0,
        }
    }

    /// The names, lowest first (what a command line offers).
    pub const NAMES: [&'static str; 3] = ["low", "medium", "high"];

    /// Parses `low`, `medium` or `high`.
    pub fn parse(s: &str) -> Option<Confidence> {
        match s {
            "low" => Some(Confidence::Low),
            "medium" => Some(Confidence::Medium),
            "high" => Some(Confidence::High),
            _ => None,
        }
    }
}

/// A check run on a regex match before it becomes a finding. Validators turn "looks like" into
/// "is": a 16-digit number is only reported as a card if its Luhn digit and issuer prefix agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Validator {
    /// A GitHub-style token (GitHub's `ghp_`/`gho_`/`ghu_`/`ghs_`, npm's `npm_`): its last six
    /// characters are the CRC-32 of the 30 before them, in base 62 ([`crate::checksum`]).
    Base62Crc32,
    /// A JSON Web Token, `header.payload.signature`: header and payload decode (base64url) to
    /// JSON objects, the header naming its `alg` ([`crate::checksum::jwt_structure`]).
    Jwt,
    /// A PyPI API token: `pypi-` and the base64url of a whole version 2 macaroon
    /// ([`crate::checksum::pypi_macaroon`]).
    PypiMacaroon,
    /// An SPDX license expression whose every identifier is on the SPDX License List (or the
    /// user's own `LicenseRef-`) ([`crate::spdx::check_expression`]).
    SpdxListed,
    /// What follows an `SPDX-License-Identifier:` tag but is not an expression of listed
    /// identifiers: an identifier not on the list, or not an expression at all.
    SpdxUnlisted,
    /// Payment card: 13–19 digits (separators ` ` and `-` allowed), a known issuer prefix with
    /// a length that issuer uses, and a valid Luhn check digit.
    PaymentCard,
    /// US social security number: area not 000, 666 or 900–999; group not 00; serial not 0000.
    UsSsn,
    /// IBAN: known country length, and the ISO 7064 mod-97 check equals 1.
    Iban,
    /// E-mail address: one `@`, a sane local part, a dotted domain with an alphabetic TLD.
    Email,
    /// Phone number: E.164 (`+` and 8–15 digits) or a North American / common national format.
    Phone,
    /// BSD-2-Clause text: the BSD redistribution clause *without* the third ("Neither the name")
    /// clause within the following text.
    Bsd2Clause,
    /// UK NHS number: 10 digits, the last a mod-11 check digit over the first nine.
    UkNhsNumber,
    /// UK National Insurance number: a prefix HMRC allocates, six digits, suffix A–D.
    UkNino,
    /// Canadian social insurance number: 9 digits, a first digit given to people, Luhn.
    CaSin,
    /// US individual taxpayer identification number: `9XX-GG-SSSS`, GG in an issued range.
    UsItin,
    /// US ABA routing transit number: a Federal Reserve prefix and the 3-7-1 weighted check.
    UsAbaRouting,
    /// US National Provider Identifier: 10 digits, Luhn under the card prefix 80840.
    UsNpi,
    /// US DEA registration number: registrant type, a letter, 7 digits with a check digit.
    UsDea,
    /// Brazilian CPF: 11 digits, two mod-11 check digits.
    BrCpf,
    /// Brazilian CNPJ: 12 characters (digits, or letters since 2026), two mod-11 check digits.
    BrCnpj,
    /// Mexican CURP: 18 characters, birth date, sex, state, consonants, check digit.
    MxCurp,
    /// Spanish DNI or NIE: 8 digits (an NIE's first one written X, Y or Z) and their mod-23 letter.
    EsDniNie,
    /// Italian codice fiscale: 16 characters with birth date and a check letter.
    ItCodiceFiscale,
    /// French NIR (INSEE number): 13 characters and a mod-97 key.
    FrNir,
    /// German tax identification number: 11 digits, one digit repeated, ISO 7064 MOD 11,10.
    DeTaxId,
    /// Dutch BSN: 9 digits passing the eleven test.
    NlBsn,
    /// Belgian national register number: birth date, serial and a mod-97 check.
    BeNationalNumber,
    /// Polish PESEL: birth date with a century-coded month and a weighted check digit.
    PlPesel,
    /// Swedish personnummer or samordningsnummer: birth date, serial, Luhn.
    SePersonnummer,
    /// Finnish henkilötunnus: birth date, century sign, serial and a mod-31 check character.
    FiHetu,
    /// Norwegian fødselsnummer or D-number: birth date, serial and two mod-11 check digits.
    NoFodselsnummer,
    /// Danish CPR number: a valid birth date whose century the serial's first digit tells.
    DkCpr,
    /// Indian Aadhaar number: 12 digits, not starting with 0 or 1, Verhoeff check digit.
    InAadhaar,
    /// Indian PAN: 5 letters (the fourth a holder type), 4 digits, a letter.
    InPan,
    /// Australian tax file number: 8 or 9 digits with a weighted mod-11 check.
    AuTfn,
    /// Australian Medicare card number: 10 digits (and an optional IRN), weighted check digit.
    AuMedicare,
    /// Australian Business Number: 11 digits, weighted mod-89 check.
    AuAbn,
    /// Singapore NRIC or FIN: S, T, F or G, 7 digits and a check letter.
    SgNric,
    /// South African identity number: birth date, citizenship digit, Luhn.
    ZaId,
    /// Chinese resident identity number: region, birth date, serial, ISO 7064 MOD 11-2.
    CnResidentId,
    /// Japanese individual number (My Number): 12 digits with a mod-11 check digit.
    JpMyNumber,
    /// Korean resident registration number: a birth date and a sex/century digit.
    KrRrn,
    /// Swiss AHV/AVS number: `756` and 10 digits, an EAN-13 check digit.
    ChAhv,
    /// Vehicle identification number: 17 characters whose ninth is the check digit.
    Vin,
    /// Bitcoin address: base58check (`1…`, `3…`) or bech32/bech32m (`bc1…`) with its checksum.
    BitcoinAddress,
    /// IPv4 address outside the private, shared, loopback, link-local, documentation,
    /// multicast and reserved ranges, and not part of a longer dotted number or a CIDR block.
    Ipv4Public,
    /// MAC address: six octets in one separator style, unicast, not all zeros.
    MacAddress,
    /// A calendar date (year 1900–2099) in one separator style.
    DateOfBirth,
}

/// Exceptions to a rule. A candidate is dropped if any of these says so.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Allowlist {
    /// Regexes tested against the secret (the selected group, or the whole match).
    pub regexes: Vec<String>,
    /// Substrings (matched ASCII case-insensitively) that mark the secret as an example.
    pub stopwords: Vec<String>,
    /// Regexes tested against the file path; a match disables the rule for that file.
    pub paths: Vec<String>,
}

impl Allowlist {
    /// True if the allowlist has no entries at all.
    pub fn is_empty(&self) -> bool {
        self.regexes.is_empty() && self.stopwords.is_empty() && self.paths.is_empty()
    }
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// Stable identifier, e.g. `aws-access-key-id`; SARIF `ruleId`.
    pub id: String,
    /// One line describing what the rule finds.
    pub description: String,
    /// Regex (regex-automata syntax, matched over bytes, Unicode classes off).
    pub regex: String,
    /// Capture group holding the secret; 0 means the whole match.
    #[serde(default)]
    pub secret_group: u32,
    /// Literals of which at least one must occur near a match (ASCII case-insensitive). They
    /// feed the Aho–Corasick prefilter; a rule with no keywords runs over all text.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Minimum Shannon entropy (bits per byte) of the secret.
    #[serde(default)]
    pub entropy: Option<f32>,
    /// A validator the match must pass.
    #[serde(default)]
    pub validator: Option<Validator>,
    /// The match may span lines: the regex sees up to [`MULTILINE_WINDOW`] bytes after the
    /// line holding the keyword instead of that line only.
    #[serde(default)]
    pub multiline: bool,
    /// Exceptions.
    #[serde(default)]
    pub allowlist: Allowlist,
    /// Severity of findings.
    pub severity: Severity,
    /// Category of findings.
    pub category: Category,
    /// What to do about a finding (SARIF `help.text`).
    pub help: String,
    /// For license rules: the SPDX identifier the rule recognises (reported instead of a
    /// redacted secret). Unused for other categories.
    #[serde(default)]
    pub spdx: Option<String>,
    /// A catch-all (a secret-looking name assigned a high-entropy value, a password in a URL; a
    /// license text's opening lines): where it and a specific rule of its category find
    /// overlapping secrets, the specific rule's finding is the one reported, wherever the two
    /// stand in the policy.
    #[serde(default)]
    pub generic: bool,
    /// How sure its findings are ([`Rule::confidence`] when unset); a finding in a test fixture
    /// is one step less sure. Left out of the serialized policy when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<Confidence>,
    /// Finds the licence texts of the SPDX License List by normalised matching
    /// ([`crate::license_text`]) instead of a regex (`regex` is then empty): a `license`,
    /// `multiline` rule whose keywords are the trigger words that open the windows searched.
    /// Each finding reports the text's SPDX identifier and a match score. Left out of the
    /// serialized policy when unset.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub license_texts: bool,
}

impl Rule {
    /// The confidence of this rule's findings: as set, else by what the rule is. A provider's
    /// own token format or a licence text: `high`. A generic secret rule, or personal data a
    /// checksum validates (cards, IBANs, national identifiers with check digits) or the SSN's
    /// structure: `medium`. Other personal data (e-mail addresses, phone numbers, identifiers
    /// with a structure but no check digit, context-anchored values): `low`.
    pub fn confidence(&self) -> Confidence {
        if let Some(c) = self.confidence {
            return c;
        }
        match self.category {
            Category::Secret if self.generic => Confidence::Medium,
            Category::Secret | Category::License => Confidence::High,
            Category::Pii => match self.validator {
                Some(
                    Validator::PaymentCard
                    | Validator::UsSsn
                    | Validator::Iban
                    | Validator::UkNhsNumber
                    | Validator::CaSin
                    | Validator::UsAbaRouting
                    | Validator::UsNpi
                    | Validator::UsDea
                    | Validator::BrCpf
                    | Validator::BrCnpj
                    | Validator::MxCurp
                    | Validator::EsDniNie
                    | Validator::ItCodiceFiscale
                    | Validator::FrNir
                    | Validator::DeTaxId
                    | Validator::NlBsn
                    | Validator::BeNationalNumber
                    | Validator::PlPesel
                    | Validator::SePersonnummer
                    | Validator::FiHetu
                    | Validator::NoFodselsnummer
                    | Validator::InAadhaar
                    | Validator::AuTfn
                    | Validator::AuMedicare
                    | Validator::AuAbn
                    | Validator::SgNric
                    | Validator::ZaId
                    | Validator::CnResidentId
                    | Validator::JpMyNumber
                    | Validator::ChAhv
                    | Validator::Vin
                    | Validator::BitcoinAddress,
                ) => Confidence::Medium,
                _ => Confidence::Low,
            },
        }
    }
}

/// How far past its keyword's line a `multiline` rule's regex may look, in bytes. Also the
/// longest match the streaming scanner guarantees to see whole.
pub const MULTILINE_WINDOW: usize = 8 * 1024;

/// How many lines before its trigger's line a licence-text window starts: a short text's first
/// lines may hold no trigger word. Lines, not bytes: a history scan empties the lines it
/// carries over, and its multi-line clusters start as far back.
pub const WINDOW_LOOKBACK_LINES: usize = 4;
