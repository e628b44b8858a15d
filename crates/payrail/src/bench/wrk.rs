//! `payrail bench --wrk DIR`: the same debits, for wrk to send.
//!
//! wrk's Lua has no HMAC, and signing in pure Lua would make wrk the
//! bottleneck, so the harness signs the requests ahead: one file of complete
//! paths per wrk thread (threads do not share state in wrk, and a path must
//! never be sent twice, so each thread gets its own file), and a script that
//! sends them in order and counts every answer that is not SUCCESS.

use std::io::Write;
use std::path::Path;

use super::DebitLoad;
use super::load::Workload;

/// The wrk script; `@FILES@` becomes the list of path files.
const SCRIPT: &str = r#"-- Signed /debitwallet requests for wrk, written by `payrail bench --wrk`.
-- Each wrk thread sends the paths of its own file in order; every orderid is
-- new, so every answer should be SUCCESS (statuscode "0"). A thread that runs
-- out starts its file again, and the server refuses those repeats (304): they
-- are counted below as not SUCCESS. Run with at most as many threads as files.
local files = { @FILES@ }
local threads = {}

function setup(thread)
  thread:set("file", files[#threads % #files + 1])
  table.insert(threads, thread)
end

local requests, i = {}, 0
bad = 0

function init(args)
  for path in io.lines(file) do
    requests[#requests + 1] = wrk.format("GET", path)
  end
end

function request()
  i = i % #requests + 1
  return requests[i]
end

function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"statuscode":"0"', 1, true) then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do
    total = total + t:get("bad")
  end
  io.write(string.format("debits not SUCCESS: %d of %d\n", total, summary.requests))
  if #threads > #files then
    io.write(string.format("warning: %d threads share %d files; repeats are refused\n", #threads, #files))
  end
end
"#;

/// Writes `threads` files of `per_thread` signed paths and `debit.lua` into
/// `dir`; returns the script's path.
pub fn write(
    dir: &Path,
    load: &DebitLoad,
    threads: usize,
    per_thread: u64,
) -> Result<std::path::PathBuf, String> {
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let dir = dir.canonicalize().map_err(|e| err(dir, e))?;
    // Orderids: this run's random tag, a fresh epoch, the file's number and
    // the line's; so no two lines of any files share one.
    load.begin();
    let epoch = load.epoch.load(std::sync::atomic::Ordering::SeqCst);
    let mut files = Vec::with_capacity(threads);
    for t in 0..threads {
        let path = dir.join(format!("debits-{t}.paths"));
        let file = std::fs::File::create(&path).map_err(|e| err(&path, e))?;
        let mut out = std::io::BufWriter::new(file);
        for n in 0..per_thread {
            writeln!(out, "{}", load.path(epoch, t, n)).map_err(|e| err(&path, e))?;
        }
        out.flush().map_err(|e| err(&path, e))?;
        files.push(lua_string(&path.display().to_string())?);
    }
    let script = dir.join("debit.lua");
    std::fs::write(&script, SCRIPT.replace("@FILES@", &files.join(", ")))
        .map_err(|e| err(&script, e))?;
    Ok(script)
}

/// A Lua string literal for a file name (quotes and backslashes escaped).
fn lua_string(s: &str) -> Result<String, String> {
    if s.chars().any(char::is_control) {
        return Err(format!("{s:?}: control characters in a path"));
    }
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lua_strings_are_escaped() {
        assert_eq!(lua_string(r#"/a"b\c"#).unwrap(), r#""/a\"b\\c""#);
        assert!(lua_string("/a\nb").is_err());
    }
}
