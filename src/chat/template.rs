//! Jinja chat templates rendered with minijinja the way transformers renders them.
//!
//! transformers (`chat_template_utils.py`) compiles templates in an `ImmutableSandboxedEnvironment`
//! with `trim_blocks`, `lstrip_blocks` and the `loopcontrols` extension, overrides `tojson` with
//! `json.dumps` semantics, and adds the globals `raise_exception` and `strftime_now`; the special
//! tokens (`bos_token`, `eos_token`, …) and any extra keyword arguments become template variables.
//! Python string/dict methods (`.strip()`, `.split()`, `.items()`, …) come from minijinja-contrib's
//! `pycompat`.

use std::fmt::Write as _;

use minijinja::{context, Environment, ErrorKind, Value};

use super::{pyjson, Message, ToolCallFormat};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

const TEMPLATE_NAME: &str = "chat_template";

fn template_error(e: &minijinja::Error) -> Error {
    let mut reason = e.to_string();
    if let Some(detail) = e.detail() {
        if !reason.contains(detail) {
            let _ = write!(reason, ": {detail}");
        }
    }
    Error::ChatTemplate { reason }
}

/// A compiled chat template plus the special-token strings it may reference.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token`/`eos_token` are the strings the template sees as variables.
    ///
    /// Errors: [`Error::ChatTemplate`] on a syntax error.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", pyjson::tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(|e| template_error(&e))?;
        Ok(Self { env, source: source.to_string(), bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// The template of `tok` (tokenizer_config.json's `chat_template` or GGUF
    /// `tokenizer.chat_template`), with its BOS/EOS token strings.
    ///
    /// Errors: [`Error::ChatTemplate`] when the model has none or it does not compile.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let source = tok.chat_template().ok_or_else(|| Error::ChatTemplate {
            reason: "the model has no chat template (no `chat_template` in tokenizer_config.json or \
                     `tokenizer.chat_template` in the GGUF); use a plain text prompt"
                .into(),
        })?;
        let text = |id: Option<u32>| id.and_then(|i| tok.inner().id_to_token(i)).unwrap_or_default();
        Self::new(source, &text(tok.bos_token_id()), &text(tok.eos_token_ids().first().copied()))
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the assistant header.
    ///
    /// Errors: [`Error::ChatTemplate`] when rendering fails, including the template's own
    /// `raise_exception(...)` (e.g. roles that do not alternate).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_context(context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
        })
    }

    /// Renders `messages` with the functions `tools` (OpenAI / transformers shape
    /// `{"type": "function", "function": {"name", "description", "parameters"}}`) as
    /// `apply_chat_template(messages, tools=tools)` does; no `tools` variable when the list is
    /// empty (transformers passes `None`).
    ///
    /// Errors: as [`ChatTemplate::render`].
    pub fn render_with_tools(&self, messages: &[Message], tools: &[serde_json::Value], add_generation_prompt: bool) -> Result<String> {
        if tools.is_empty() {
            return self.render(messages, add_generation_prompt);
        }
        self.render_context(context! {
            messages => Value::from_serialize(messages),
            tools => Value::from_serialize(tools),
            add_generation_prompt => add_generation_prompt,
        })
    }

    /// The syntax this template teaches the model for tool calls, if it supports tools.
    pub fn tool_call_format(&self) -> Option<ToolCallFormat> {
        ToolCallFormat::detect(&self.source)
    }

    /// Renders with any variables (`messages`, `tools`, `add_generation_prompt`, `date_string`,
    /// `enable_thinking`, …), like transformers' `apply_chat_template(..., **kwargs)`. `bos_token`
    /// and `eos_token` are supplied unless `vars` sets them.
    pub fn render_context(&self, vars: Value) -> Result<String> {
        let ctx = context! { ..vars, ..context! { bos_token => &self.bos_token, eos_token => &self.eos_token } };
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| template_error(&e))?;
        template.render(ctx).map_err(|e| template_error(&e))
    }
}

/// `raise_exception(message)`: the template rejects its input.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the local time formatted like Python's `strftime`.
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format))
        .map_err(|_| minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}")))?;
    Ok(Value::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, vars: Value) -> Result<String> {
        ChatTemplate::new(src, "<s>", "</s>")?.render_context(vars)
    }

    #[test]
    fn python_jinja_behaviours() {
        let msgs = Value::from_serialize(vec![Message::user(" hi ")]);
        let src = "{{ bos_token }}{% for m in messages %}{% if loop.first %}[{{ m.role }}]{% endif %}\n  {% if m.content.strip() == 'hi' %}{{ m.content | trim }}{% continue %}{% endif %}\nX{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}\n";
        assert_eq!(render(src, context! { messages => msgs, add_generation_prompt => true }).unwrap(), "<s>[user]hi</s>");
        let err = render("{{ raise_exception('roles must alternate') }}", context! {}).unwrap_err();
        assert!(matches!(&err, Error::ChatTemplate { reason } if reason.contains("roles must alternate")), "{err}");
        let year = render("{{ strftime_now('%Y') }}", context! {}).unwrap();
        assert_eq!(year, chrono::Local::now().format("%Y").to_string());
        assert!(matches!(ChatTemplate::new("{% if %}", "", ""), Err(Error::ChatTemplate { .. })));
        // Variables given by the caller win over the defaults.
        assert_eq!(render("{{ bos_token }}", context! { bos_token => "B" }).unwrap(), "B");
    }
}
