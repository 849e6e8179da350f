//! The envelope around every reply: zero or more log messages, then STDERR_LAST
//! (the op's result follows) or STDERR_ERROR (no result follows).

use crate::codec::*;
use crate::error::{Error, Result};
use crate::logger::{Activity, Field, Logger};
use crate::protocol::*;

/// How the daemon ended its reply envelope.
pub(crate) enum Outcome {
    /// STDERR_LAST: the op's result follows.
    Last,
    /// STDERR_ERROR: the op failed.
    Failed(DaemonMessage),
}

/// An error as the daemon sent it, before it is tied to a request.
#[derive(Clone, Debug)]
pub(crate) struct DaemonMessage {
    pub message: String,
    pub level: u64,
    pub status: Option<u64>,
    pub traces: Vec<String>,
}

/// Reads log messages, handing them to `logger`, until the envelope ends.
pub(crate) async fn read_envelope(d: &mut Decoder, logger: &dyn Logger) -> Result<Outcome> {
    loop {
        let msg = d.u64().await?;
        match msg {
            STDERR_LAST => return Ok(Outcome::Last),
            STDERR_ERROR => return Ok(Outcome::Failed(read_error(d).await?)),
            STDERR_NEXT => {
                let line = d.text().await?;
                logger.log(line.strip_suffix('\n').unwrap_or(&line));
            }
            STDERR_START_ACTIVITY => {
                let id = d.u64().await?;
                let level = d.u64().await?;
                let activity_type = d.u64().await?;
                let text = d.text().await?;
                let fields = read_fields(d).await?;
                let parent = d.u64().await?;
                logger.start_activity(Activity { id, level, activity_type, text, fields, parent });
            }
            STDERR_STOP_ACTIVITY => logger.stop_activity(d.u64().await?),
            STDERR_RESULT => {
                let id = d.u64().await?;
                let result_type = d.u64().await?;
                let fields = read_fields(d).await?;
                logger.result(id, result_type, fields);
            }
            STDERR_WRITE => logger.write(&d.bytes().await?),
            STDERR_READ => {
                // Only ImportPaths and AddToStoreNar before 1.23 ask for data; this client
                // sends neither, and answering would break the pipeline.
                return Err(Error::Protocol(
                    "the daemon asked for data (STDERR_READ), which this client never offers".into(),
                ));
            }
            other => return Err(Error::Protocol(format!("unknown message type {other:#x} in a reply"))),
        }
    }
}

async fn read_fields(d: &mut Decoder) -> Result<Vec<Field>> {
    let n = d.count().await?;
    let mut fields = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        fields.push(match d.u64().await? {
            0 => Field::Int(d.u64().await?),
            1 => Field::String(d.text().await?),
            t => return Err(Error::Protocol(format!("unsupported log field type {t}"))),
        });
    }
    Ok(fields)
}

async fn read_error(d: &mut Decoder) -> Result<DaemonMessage> {
    if !d.version().at_least(26) {
        let message = d.text().await?;
        let status = d.u64().await?;
        return Ok(DaemonMessage { message, level: 0, status: Some(status), traces: Vec::new() });
    }
    let kind = d.text().await?;
    if kind != "Error" {
        return Err(Error::Protocol(format!("error of unknown kind '{kind}'")));
    }
    let level = d.u64().await?;
    let _name = d.text().await?; // always "Error", no longer used
    let message = d.text().await?;
    if d.u64().await? != 0 {
        return Err(Error::Protocol("error with a position, which the protocol never sends".into()));
    }
    let n = d.count().await?;
    let mut traces = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        if d.u64().await? != 0 {
            return Err(Error::Protocol("error trace with a position, which the protocol never sends".into()));
        }
        traces.push(d.text().await?);
    }
    Ok(DaemonMessage { message, level, status: None, traces })
}
