//! Loading Dapr resource YAML (`kind: Component`) from `--resources-path` directories, and
//! opening the component each one describes.
//!
//! Every problem is reported with the file and the field, and loading stops at the first one:
//! a host never starts half-configured. Resources of other kinds (Subscription, Resiliency,
//! Configuration, HTTPEndpoint) are skipped here; their building blocks load them.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_norway::Value;

use crate::state::{self, StateStore};

/// Component types this build can open.
pub const STATE_TYPES: &[&str] = &["state.sled", "state.redis", "state.postgresql"];

/// One `kind: Component` resource, validated.
#[derive(Debug, Clone)]
pub struct ComponentSpec {
    pub name: String,
    /// `spec.type`, e.g. `state.redis`.
    pub kind: String,
    /// `spec.version`, e.g. `v1`.
    pub version: String,
    /// `spec.metadata` as name -> value, with templates (`{uuid}`, `{appID}`, ...) expanded.
    pub metadata: BTreeMap<String, String>,
    /// `spec.ignoreErrors`: a component that fails to start is skipped instead of stopping the host.
    pub ignore_errors: bool,
    /// Where it came from; `None` for the embedded defaults.
    pub file: Option<PathBuf>,
}

/// A resource that cannot be loaded or a component that cannot start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentError {
    pub file: Option<PathBuf>,
    pub component: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ComponentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(c) = &self.component {
            write!(f, "component {c:?}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ComponentError {}

impl ComponentSpec {
    fn error(&self, field: Option<String>, message: String) -> ComponentError {
        ComponentError {
            file: self.file.clone(),
            component: Some(self.name.clone()),
            field,
            message,
        }
    }

    /// A metadata value that must be present and non-empty.
    pub fn required(&self, name: &str) -> Result<&str, ComponentError> {
        match self.metadata.get(name).map(String::as_str) {
            Some(v) if !v.trim().is_empty() => Ok(v),
            _ => Err(self.error(
                Some(format!("spec.metadata.{name}")),
                format!("is required for {}", self.kind),
            )),
        }
    }

    pub fn optional(&self, name: &str) -> Option<&str> {
        self.metadata.get(name).map(String::as_str)
    }

    /// A metadata value that is present but wrong.
    pub fn invalid(&self, name: &str, why: &str) -> ComponentError {
        self.error(Some(format!("spec.metadata.{name}")), why.to_string())
    }

    /// The component could not start.
    pub fn failed(&self, e: impl fmt::Display) -> ComponentError {
        self.error(None, format!("failed to start: {e}"))
    }

    /// `actorStateStore: "true"`.
    pub fn is_actor_state_store(&self) -> bool {
        self.optional("actorStateStore")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
}

/// Where the host is, for scoping and templates.
#[derive(Debug, Clone)]
pub struct LoadContext {
    pub app_id: String,
    pub namespace: String,
}

#[derive(Deserialize)]
struct RawResource {
    kind: Option<String>,
    metadata: Option<RawMeta>,
    spec: Option<RawSpec>,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Deserialize)]
struct RawMeta {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    #[serde(rename = "type")]
    kind: Option<String>,
    version: Option<Value>,
    #[serde(default)]
    metadata: Vec<RawItem>,
    #[serde(default)]
    ignore_errors: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawItem {
    name: Option<String>,
    value: Option<Value>,
    secret_key_ref: Option<Value>,
}

/// Loads every `*.yaml` / `*.yml` file of every directory, in name order.
pub fn load_dirs(
    dirs: &[PathBuf],
    ctx: &LoadContext,
) -> Result<Vec<ComponentSpec>, ComponentError> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for dir in dirs {
        let err = |m: String| ComponentError {
            file: Some(dir.clone()),
            component: None,
            field: None,
            message: m,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| {
            err(format!(
                "cannot read resources directory: {e} (check --resources-path)"
            ))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| ComponentError {
                file: Some(file.clone()),
                component: None,
                field: None,
                message: format!("cannot read: {e}"),
            })?;
            for spec in parse_file(&file, &text, ctx)? {
                if !names.insert(spec.name.clone()) {
                    return Err(spec.error(
                        Some("metadata.name".into()),
                        "another component already has this name".into(),
                    ));
                }
                out.push(spec);
            }
        }
    }
    Ok(out)
}

/// Parses one file (possibly several `---` documents) and keeps the components meant for this app.
pub fn parse_file(
    file: &Path,
    text: &str,
    ctx: &LoadContext,
) -> Result<Vec<ComponentSpec>, ComponentError> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let at = |field: Option<&str>, component: Option<&str>, message: String| ComponentError {
            file: Some(file.to_path_buf()),
            component: component.map(str::to_string),
            field: field.map(str::to_string),
            message,
        };
        let value = Value::deserialize(doc).map_err(|e| {
            at(
                None,
                None,
                format!("document {} is not valid YAML: {e}", i + 1),
            )
        })?;
        if value.is_null() {
            continue;
        }
        let raw: RawResource = serde_norway::from_value(value).map_err(|e| {
            at(
                None,
                None,
                format!("document {} is not a resource: {e}", i + 1),
            )
        })?;
        let kind = raw
            .kind
            .ok_or_else(|| at(Some("kind"), None, "is required".into()))?;
        if kind != "Component" {
            tracing::debug!(file = %file.display(), kind, "skipping resource that is not a Component");
            continue;
        }
        let meta = raw
            .metadata
            .ok_or_else(|| at(Some("metadata"), None, "is required".into()))?;
        let name = meta
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| at(Some("metadata.name"), None, "is required".into()))?;
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(at(
                Some("metadata.name"),
                Some(&name),
                "may hold only letters, digits, '-', '_' and '.'".into(),
            ));
        }
        if let Some(ns) = meta.namespace.filter(|n| !n.is_empty()) {
            if ns != ctx.namespace {
                tracing::info!(file = %file.display(), component = name, namespace = ns, "skipping component of another namespace");
                continue;
            }
        }
        if !raw.scopes.is_empty() && !raw.scopes.iter().any(|s| s == &ctx.app_id) {
            tracing::info!(file = %file.display(), component = name, "skipping component scoped to other apps");
            continue;
        }
        let c = Some(name.as_str());
        let spec = raw
            .spec
            .ok_or_else(|| at(Some("spec"), c, "is required".into()))?;
        let kind = spec
            .kind
            .filter(|k| !k.is_empty())
            .ok_or_else(|| at(Some("spec.type"), c, "is required".into()))?;
        let version = match spec.version {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(at(Some("spec.version"), c, "is required (e.g. v1)".into())),
        };
        let mut metadata = BTreeMap::new();
        for (j, item) in spec.metadata.into_iter().enumerate() {
            let field = format!("spec.metadata[{j}]");
            let key = item
                .name
                .filter(|n| !n.is_empty())
                .ok_or_else(|| at(Some(&format!("{field}.name")), c, "is required".into()))?;
            if item.secret_key_ref.is_some() {
                return Err(at(
                    Some(&format!("spec.metadata.{key}.secretKeyRef")),
                    c,
                    "secret references need a secret store, which this build does not load yet; put the value inline".into(),
                ));
            }
            let value = match item.value {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s,
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                Some(_) => {
                    return Err(at(
                        Some(&format!("spec.metadata.{key}")),
                        c,
                        "value must be a string, number or bool".into(),
                    ))
                }
            };
            metadata.insert(key, expand(&value, ctx));
        }
        let spec = ComponentSpec {
            name,
            kind,
            version,
            metadata,
            ignore_errors: spec.ignore_errors,
            file: Some(file.to_path_buf()),
        };
        check_known(&spec)?;
        out.push(spec);
    }
    Ok(out)
}

fn expand(v: &str, ctx: &LoadContext) -> String {
    if !v.contains('{') {
        return v.to_string();
    }
    v.replace("{uuid}", &uuid::Uuid::new_v4().to_string())
        .replace("{appID}", &ctx.app_id)
        .replace("{namespace}", &ctx.namespace)
        .replace("{podName}", &ctx.app_id)
}

fn check_known(spec: &ComponentSpec) -> Result<(), ComponentError> {
    if !STATE_TYPES.contains(&spec.kind.as_str()) {
        return Err(spec.error(
            Some("spec.type".into()),
            format!(
                "unknown component type {:?}; this build supports {}",
                spec.kind,
                STATE_TYPES.join(", ")
            ),
        ));
    }
    if spec.version != "v1" && !(spec.kind == "state.postgresql" && spec.version == "v2") {
        return Err(spec.error(
            Some("spec.version".into()),
            format!(
                "unsupported version {:?} for {} (use v1)",
                spec.version, spec.kind
            ),
        ));
    }
    Ok(())
}

/// The embedded default: `statestore`, `state.sled`, the actor state store.
pub fn default_state_store() -> ComponentSpec {
    ComponentSpec {
        name: "statestore".into(),
        kind: "state.sled".into(),
        version: "v1".into(),
        metadata: [("actorStateStore".to_string(), "true".to_string())].into(),
        ignore_errors: false,
        file: None,
    }
}

/// Opens a state store. `data_dir` holds embedded stores that do not name a `path`.
pub async fn open_state_store(
    spec: &ComponentSpec,
    data_dir: &Path,
) -> Result<Arc<dyn StateStore>, ComponentError> {
    match spec.kind.as_str() {
        "state.sled" => {
            let dir = match spec.optional("path").filter(|p| !p.is_empty()) {
                Some(p) => PathBuf::from(p),
                None => data_dir.join("state").join(&spec.name),
            };
            Ok(Arc::new(
                state::sled::SledStore::open(&dir).map_err(|e| spec.failed(e))?,
            ))
        }
        "state.redis" => Ok(Arc::new(state::redis::RedisStore::connect(spec).await?)),
        "state.postgresql" => Ok(Arc::new(
            state::postgres::PostgresStore::connect(spec).await?,
        )),
        other => Err(spec.error(
            Some("spec.type".into()),
            format!("unknown component type {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> LoadContext {
        LoadContext {
            app_id: "app".into(),
            namespace: "default".into(),
        }
    }

    fn parse(text: &str) -> Result<Vec<ComponentSpec>, ComponentError> {
        parse_file(Path::new("c.yaml"), text, &ctx())
    }

    #[test]
    fn seed_state_store_parses() {
        let s = parse(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: statestore\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: redis:6379\n  - name: actorStateStore\n    value: true\n",
        )
        .unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].required("redisHost").unwrap(), "redis:6379");
        assert!(s[0].is_actor_state_store());
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = parse("kind: Component\nmetadata:\n  name: s\nspec:\n  version: v1\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("spec.type"));
        assert_eq!(
            e.to_string(),
            "c.yaml: component \"s\": field `spec.type`: is required"
        );
        let e = parse(
            "kind: Component\nmetadata:\n  name: s\nspec:\n  type: pubsub.kafka\n  version: v1\n",
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("spec.type"));
        assert!(e.message.contains("unknown component type"), "{e}");
        let e = parse("kind: Component\nmetadata:\n  name: s\nspec: [\n").unwrap_err();
        assert!(e.message.contains("not valid YAML"), "{e}");
    }

    #[test]
    fn scopes_namespaces_and_other_kinds_are_skipped() {
        let s = parse(
            "kind: Component\nmetadata:\n  name: a\nspec:\n  type: state.sled\n  version: v1\nscopes: [other]\n---\nkind: Subscription\nmetadata:\n  name: sub\n---\nkind: Component\nmetadata:\n  name: b\n  namespace: prod\nspec:\n  type: state.sled\n  version: v1\n---\nkind: Component\nmetadata:\n  name: c\nspec:\n  type: state.sled\n  version: v1\nscopes: [app]\n",
        )
        .unwrap();
        assert_eq!(s.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn templates_expand_and_required_fields_are_checked() {
        let s = parse("kind: Component\nmetadata:\n  name: s\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: \"\"\n  - name: prefix\n    value: \"{appID}-x\"\n").unwrap();
        assert_eq!(s[0].optional("prefix"), Some("app-x"));
        let e = s[0].required("redisHost").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("spec.metadata.redisHost"));
    }
}
