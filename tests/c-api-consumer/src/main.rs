//! A program that embeds Nix through the fork's C API, as a tool outside Nix would.
//!
//! Usage: `c-api-consumer EXPR`
//!
//! Opens the default store, evaluates EXPR, which must give a string (a derivation's
//! `drvPath`, say), and prints that string on stdout. Flakes are registered
//! (libflake-c), so EXPR may use `builtins.getFlake` where the `flakes` experimental
//! feature is enabled. On stderr it prints
//! `store: URI`, the store it opened, and `rust-client-threads: N`, how many of its
//! threads belong to the Rust daemon client's runtime. Any error ends it with
//! status 1 and Nix's message on stderr.

#[allow(non_camel_case_types, non_upper_case_globals, non_snake_case, dead_code)]
mod ffi {
    include!(concat!(env!("OUT_DIR"), "/nix_c_api.rs"));
}

use std::ffi::{c_char, c_uint, c_void, CString};
use std::os::unix::ffi::OsStringExt;
use std::process::ExitCode;
use std::ptr;

/// The Rust client's runtime names its threads "nix-daemon-client"; the kernel keeps
/// the first 15 bytes of a thread's name.
const CLIENT_THREAD_PREFIX: &str = "nix-daemon-clie";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(expr), None) = (args.next(), args.next()) else {
        eprintln!("usage: c-api-consumer EXPR");
        return ExitCode::from(2);
    };
    match run(expr.into_vec()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("c-api-consumer: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(expr: Vec<u8>) -> Result<(), String> {
    let expr = CString::new(expr).map_err(|_| "the expression contains a NUL byte".to_string())?;
    // Relative paths in the expression are taken from the working directory, as the
    // CLI's --expr does.
    let base = std::env::current_dir().map_err(|e| format!("cannot read the working directory: {e}"))?;
    let base = CString::new(base.into_os_string().into_vec())
        .map_err(|_| "the working directory contains a NUL byte".to_string())?;

    // Declared in this order so that they are freed in the reverse one: the value,
    // the evaluator, the store, then the context.
    let ctx = Context::new()?;
    ctx.ok("nix_libutil_init", unsafe { ffi::nix_libutil_init(ctx.0) })?;
    ctx.ok("nix_libstore_init", unsafe { ffi::nix_libstore_init(ctx.0) })?;
    ctx.ok("nix_libexpr_init", unsafe { ffi::nix_libexpr_init(ctx.0) })?;
    let flake_settings = unsafe { ffi::nix_flake_settings_new(ctx.0) };
    let flake_settings = FlakeSettings(ctx.non_null("nix_flake_settings_new", flake_settings)?);
    ctx.ok("nix_flake_init_global", unsafe { ffi::nix_flake_init_global(ctx.0, flake_settings.0) })?;

    // A null URI: the store the settings choose (`auto` unless configured).
    let store = unsafe { ffi::nix_store_open(ctx.0, ptr::null(), ptr::null_mut()) };
    let store = Store(ctx.non_null("opening the default store", store)?);
    let uri = ctx.string("nix_store_get_uri", |callback, data| unsafe {
        ffi::nix_store_get_uri(ctx.0, store.0, callback, data)
    })?;
    eprintln!("store: {uri}");

    let state = unsafe { ffi::nix_state_create(ctx.0, ptr::null_mut(), store.0) };
    let state = EvalState(ctx.non_null("nix_state_create", state)?);
    let value = unsafe { ffi::nix_alloc_value(ctx.0, state.0) };
    let value = Value { ctx: &ctx, ptr: ctx.non_null("nix_alloc_value", value)? };
    ctx.ok("evaluating the expression", unsafe {
        ffi::nix_expr_eval_from_string(ctx.0, state.0, expr.as_ptr(), base.as_ptr(), value.ptr)
    })?;
    ctx.ok("forcing the value", unsafe { ffi::nix_value_force(ctx.0, state.0, value.ptr) })?;
    let ty = unsafe { ffi::nix_get_type(ctx.0, value.ptr) };
    ctx.check("nix_get_type")?;
    if ty != ffi::NIX_TYPE_STRING {
        return Err(format!("the expression is {}, not a string", type_name(ty)));
    }
    let result = ctx
        .string("nix_get_string", |callback, data| unsafe { ffi::nix_get_string(ctx.0, value.ptr, callback, data) })?;
    println!("{result}");

    eprintln!("rust-client-threads: {}", rust_client_threads());
    Ok(())
}

/// How many of this process's threads are the Rust daemon client's.
fn rust_client_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|name| name.starts_with(CLIENT_THREAD_PREFIX))
        })
        .count()
}

fn type_name(ty: ffi::ValueType) -> &'static str {
    match ty {
        ffi::NIX_TYPE_THUNK => "a thunk",
        ffi::NIX_TYPE_INT => "an integer",
        ffi::NIX_TYPE_FLOAT => "a float",
        ffi::NIX_TYPE_BOOL => "a Boolean",
        ffi::NIX_TYPE_STRING => "a string",
        ffi::NIX_TYPE_PATH => "a path",
        ffi::NIX_TYPE_NULL => "null",
        ffi::NIX_TYPE_ATTRS => "a set",
        ffi::NIX_TYPE_LIST => "a list",
        ffi::NIX_TYPE_FUNCTION => "a function",
        ffi::NIX_TYPE_EXTERNAL => "an external value",
        _ => "a value of an unknown type",
    }
}

/// An error context, passed to every call (so that no C++ exception reaches Rust)
/// and read after each.
struct Context(*mut ffi::nix_c_context);

impl Context {
    fn new() -> Result<Context, String> {
        let ctx = unsafe { ffi::nix_c_context_create() };
        if ctx.is_null() {
            return Err("cannot allocate a nix_c_context".into());
        }
        Ok(Context(ctx))
    }

    /// The error the last call made with this context left, if any.
    fn check(&self, what: &str) -> Result<(), String> {
        let code = unsafe { ffi::nix_err_code(self.0) };
        if code == ffi::NIX_OK {
            return Ok(());
        }
        let mut len: c_uint = 0;
        let msg = unsafe { ffi::nix_err_msg(ptr::null_mut(), self.0, &mut len) };
        if msg.is_null() {
            return Err(format!("{what}: error code {code}"));
        }
        // Borrowed from the context until its next call: copied at once.
        let msg = unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len as usize) };
        Err(format!("{what}: {}", String::from_utf8_lossy(msg)))
    }

    /// Checks a call that returns an error code.
    fn ok(&self, what: &str, code: ffi::nix_err) -> Result<(), String> {
        self.check(what)?;
        if code != ffi::NIX_OK {
            return Err(format!("{what}: error code {code}"));
        }
        Ok(())
    }

    /// Checks a call that returns an object, null on failure.
    fn non_null<T>(&self, what: &str, p: *mut T) -> Result<*mut T, String> {
        self.check(what)?;
        if p.is_null() {
            return Err(format!("{what}: failed without an error message"));
        }
        Ok(p)
    }

    /// Makes a call that hands back a string through a callback, and returns it.
    fn string(
        &self,
        what: &str,
        call: impl FnOnce(ffi::nix_get_string_callback, *mut c_void) -> ffi::nix_err,
    ) -> Result<String, String> {
        let mut buf: Vec<u8> = Vec::new();
        let code = call(Some(append_string), (&mut buf as *mut Vec<u8>).cast());
        self.ok(what, code)?;
        String::from_utf8(buf).map_err(|_| format!("{what}: the string is not UTF-8"))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        unsafe { ffi::nix_c_context_free(self.0) }
    }
}

/// The callback of [`Context::string`]: appends the string to the `Vec<u8>` that
/// `data` points to.
unsafe extern "C" fn append_string(start: *const c_char, n: c_uint, data: *mut c_void) {
    if start.is_null() || n == 0 {
        return;
    }
    // `data` is the `&mut Vec<u8>` of Context::string, alive during the call that
    // invokes this callback.
    let buf = unsafe { &mut *data.cast::<Vec<u8>>() };
    buf.extend_from_slice(unsafe { std::slice::from_raw_parts(start.cast::<u8>(), n as usize) });
}

struct FlakeSettings(*mut ffi::nix_flake_settings);

impl Drop for FlakeSettings {
    fn drop(&mut self) {
        unsafe { ffi::nix_flake_settings_free(self.0) }
    }
}

struct Store(*mut ffi::Store);

impl Drop for Store {
    fn drop(&mut self) {
        unsafe { ffi::nix_store_free(self.0) }
    }
}

struct EvalState(*mut ffi::EvalState);

impl Drop for EvalState {
    fn drop(&mut self) {
        unsafe { ffi::nix_state_free(self.0) }
    }
}

/// A value allocated by the evaluator, released through the C API's reference count.
struct Value<'a> {
    ctx: &'a Context,
    ptr: *mut ffi::nix_value,
}

impl Drop for Value<'_> {
    fn drop(&mut self) {
        // Nothing to do about a failure here; the context keeps C++ errors from
        // unwinding into Rust.
        unsafe { ffi::nix_value_decref(self.ctx.0, self.ptr) };
    }
}
