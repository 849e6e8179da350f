#pragma once
///@file
/// Where the Rust daemon client calls back into Nix's libstore
/// (rust-daemon-store.cc, which implements these): the daemon's log messages, which
/// go to Nix's logger as with the C++ daemon client, called from the connection's
/// reader thread; and replies C++ asked for without waiting, called from the
/// bridge's completion thread.

#include "rust/cxx.h"
#include <cstddef>
#include <cstdint>

namespace nix::rust_store {

/// An activity's or result's field; defined by the bridge.
struct LogField;

/// A call's outcome; defined by the bridge.
struct Outcome;

/// STDERR_NEXT: a log line, without its trailing newline.
void log_line(rust::Str line);

/// STDERR_START_ACTIVITY.
void start_activity(uint64_t id, uint64_t level, uint64_t type, rust::Str text, rust::Slice<const LogField> fields, uint64_t parent);

/// STDERR_STOP_ACTIVITY.
void stop_activity(uint64_t id);

/// STDERR_RESULT.
void activity_result(uint64_t id, uint64_t type, rust::Slice<const LogField> fields);

/// The reply to `DaemonConnection::query_path_info()` with this token.
void query_path_info_done(std::size_t token, Outcome outcome);

}
