#pragma once
///@file
/// Where the Rust daemon client hands the daemon's log messages: implemented by
/// Nix's libstore (rust-daemon-store.cc), which passes them to Nix's logger as the
/// C++ daemon client does. Called from the connection's reader thread.

#include "rust/cxx.h"
#include <cstdint>

namespace nix::rust_store {

/// An activity's or result's field; defined by the bridge.
struct LogField;

/// STDERR_NEXT: a log line, without its trailing newline.
void log_line(rust::Str line);

/// STDERR_START_ACTIVITY.
void start_activity(uint64_t id, uint64_t level, uint64_t type, rust::Str text, rust::Slice<const LogField> fields, uint64_t parent);

/// STDERR_STOP_ACTIVITY.
void stop_activity(uint64_t id);

/// STDERR_RESULT.
void activity_result(uint64_t id, uint64_t type, rust::Slice<const LogField> fields);

}
