//! [`settings!`]: a group of settings declared once — name, type, default, help and flag —
//! from which two types are made:
//!
//! - the resolved settings (`TrainConfig`), every value present: a required one has no
//!   `Option` around it, one without a default keeps its `Option`;
//! - their layer (`TrainFlags`), every field optional: what a TOML file, a resumed run's saved
//!   config and the command line each give. It derives clap's `Args` (one `--flag` per setting
//!   that has one) and serde both ways, and its `defaults()` is the bottom layer.
//!
//! Layers merge as TOML tables (the file over the defaults, the flags over the file) and the
//! result deserializes into the resolved type, which names any missing or ill-typed key.
//!
//! Each field is one of
//!
//! ```text
//! /// Help.
//! name: Type = default,                    // a default, no flag (TOML only)
//! name: Type = default => [clap args],     // a default and a flag
//! name: Type => [clap args],               // required, with a flag
//! name: Option<Type> => [clap args],       // no default (absent is meaningful), with a flag
//! name: nested Group(GroupFlags),          // a table of its own, its flags flattened
//! ```
//!
//! and `name: bool = default => switch,` or `name: Option<bool> => switch,` is a boolean flag that may be given bare (`--pack` is
//! `--pack true`) or with a value (`--pack false` turns off what a file turned on). Every flag
//! is `--name` in kebab case unless its clap args say `long = "..."`.

macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $config:ident, layer $layer:ident { $($body:tt)* }
    ) => {
        settings!(@field [$(#[$meta])*] $config $layer [] [] [] $($body)*);
    };

    (@field [$($meta:tt)*] $config:ident $layer:ident [$($cf:tt)*] [$($lf:tt)*] [$($df:tt)*]) => {
        $($meta)*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $config { $($cf)* }

        #[doc = concat!("[`", stringify!($config), "`] as a layer: each setting a file or the command line may give.")]
        #[derive(Debug, Clone, Default, PartialEq, clap::Args, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $layer { $($lf)* }

        impl $layer {
            /// The defaults, as a layer under every other.
            pub fn defaults() -> Self {
                Self { $($df)* }
            }
        }
    };

    // A table of its own.
    (@field $m:tt $c:ident $l:ident [$($cf:tt)*] [$($lf:tt)*] [$($df:tt)*]
        $(#[doc = $doc:literal])* $name:ident : nested $t:ident ( $lt:ident ), $($rest:tt)*
    ) => {
        settings!(@field $m $c $l
            [$($cf)* $(#[doc = $doc])* pub $name: $t,]
            [$($lf)* #[command(flatten)] #[serde(default)] pub $name: $lt,]
            [$($df)* $name: $lt::defaults(),]
            $($rest)*);
    };

    // Booleans given bare or with a value.
    (@field $m:tt $c:ident $l:ident [$($cf:tt)*] [$($lf:tt)*] [$($df:tt)*]
        $(#[doc = $doc:literal])* $name:ident : Option<bool> => switch, $($rest:tt)*
    ) => {
        settings!(@field $m $c $l
            [$($cf)* $(#[doc = $doc])* #[serde(default, skip_serializing_if = "Option::is_none")] pub $name: Option<bool>,]
            [$($lf)* $(#[doc = $doc])* #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")] #[serde(default, skip_serializing_if = "Option::is_none")] pub $name: Option<bool>,]
            [$($df)* $name: None,]
            $($rest)*);
    };
    (@field $m:tt $c:ident $l:ident [$($cf:tt)*] [$($lf:tt)*] [$($df:tt)*]
        $(#[doc = $doc:literal])* $name:ident : bool = $default:expr => switch, $($rest:tt)*
    ) => {
        settings!(@field $m $c $l
            [$($cf)* $(#[doc = $doc])* pub $name: bool,]
            [$($lf)* $(#[doc = $doc])* #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")] #[serde(default, skip_serializing_if = "Option::is_none")] pub $name: Option<bool>,]
            [$($df)* $name: Some($default),]
            $($rest)*);
    };

    // No default, a flag.
    (@field $m:tt $c:ident $l:ident [$($cf:tt)*] [$($lf:tt)*] [$($df:tt)*]
        $(#[doc = $doc:literal])* $name:ident : Option<$t:ty> => [$($arg:tt)*], $($rest:tt)*
    ) => {
        settings!(@field $m $c $l
            [$($cf)* $(#[doc = $doc])* #[serde(default, skip_serializing_if = "Option::is_none")] pub $name: Option<$t>,]
            [$($lf)* $(#[doc = $doc])* #[arg(long, $($arg)*)] #[serde(default, skip_serializing_if = "Option::is_none")] pub $name: Option<$t>,]
            [$($df)* $name: None,]
            $($rest)*);
    };

    // A default and a flag.
    (@field $m:tt $c:ident $l:ident [$($cf:tt)*] [$($lf:tt)*] [$($df:tt)*]
        $(#[doc = $doc:literal])* $name:ident : $t:ty = $default:expr => [$($arg:tt)*], $($rest:tt)*
    ) => {
        settings!(@field $m $c $l
            [$($cf)* $(#[doc = $doc])* pub $name: $t,]
            [$($lf)* $(#[doc = $doc])* #[arg(long, $($arg)*)] #[serde(default, skip_serializing_if = "Option::is_none")] pub $name: Option<$t>,]
            [$($df)* $name: Some($default),]
            $($rest)*);
    };

    // A default, no flag.
    (@field $m:tt $c:ident $l:ident [$($cf:tt)*] [$($lf:tt)*] [$($df:tt)*]
        $(#[doc = $doc:literal])* $name:ident : $t:ty = $default:expr, $($rest:tt)*
    ) => {
        settings!(@field $m $c $l
            [$($cf)* $(#[doc = $doc])* pub $name: $t,]
            [$($lf)* $(#[doc = $doc])* #[arg(skip)] #[serde(default, skip_serializing_if = "Option::is_none")] pub $name: Option<$t>,]
            [$($df)* $name: Some($default),]
            $($rest)*);
    };

    // Required, a flag.
    (@field $m:tt $c:ident $l:ident [$($cf:tt)*] [$($lf:tt)*] [$($df:tt)*]
        $(#[doc = $doc:literal])* $name:ident : $t:ty => [$($arg:tt)*], $($rest:tt)*
    ) => {
        settings!(@field $m $c $l
            [$($cf)* $(#[doc = $doc])* pub $name: $t,]
            [$($lf)* $(#[doc = $doc])* #[arg(long, $($arg)*)] #[serde(default, skip_serializing_if = "Option::is_none")] pub $name: Option<$t>,]
            [$($df)* $name: None,]
            $($rest)*);
    };
}

pub(crate) use settings;
