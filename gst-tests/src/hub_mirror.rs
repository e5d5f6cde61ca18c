//! `HubMirrorDouble`: a test double of the Hugging Face hub on 127.0.0.1, so that no test
//! reaches the real hub. It serves repositories in the hub's URL layout with the headers the
//! hub sends, plain URL files, and records every request:
//!
//! - `GET|HEAD /{owner}/{name}/resolve/{revision}/{path}`: `ETag` (the sha256 for weight
//!   files, as the hub gives LFS files; a git-style id for others), `X-Repo-Commit`,
//!   `Content-Length`, `Accept-Ranges`; a `Range` is answered with 206 and `Content-Range`;
//! - `GET /api/models/{owner}/{name}/revision/{revision}`: JSON with `sha` and `siblings`;
//! - `GET|HEAD /files/{path}`: plain files (the EVA URL), `Content-Length` and ranges;
//! - 401 without / 403 with a wrong bearer token for repositories that require one, 404 with
//!   the hub's `X-Error-Code` for unknown repositories, revisions and files.
//!
//! Faults can be armed per file: cut the connection after N bytes, or send damaged bytes, for
//! the next K downloads.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

/// One request as the double saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRequest {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub token: Option<String>,
}

impl MirrorRequest {
    /// A request for file content (not the one-byte probe a hub client sends to read a file's
    /// headers, not an API call, not a HEAD).
    pub fn is_download(&self) -> bool {
        self.method == "GET"
            && (self.path.contains("/resolve/") || self.path.starts_with("/files/"))
            && self.range.as_deref() != Some("bytes=0-0")
    }

    /// Whether the request was for a file whose path ends with `name`.
    pub fn is_for(&self, name: &str) -> bool {
        self.path.ends_with(&format!("/{name}"))
    }
}

#[derive(Debug, Clone)]
enum Fault {
    /// Close the connection after this many body bytes.
    CutAfter(u64),
    /// Flip one byte of the body.
    Corrupt,
}

struct Repo {
    commit: String,
    files: BTreeMap<String, Arc<Vec<u8>>>,
    token: Option<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    urls: HashMap<String, Arc<Vec<u8>>>,
    log: Vec<MirrorRequest>,
    /// File name → faults for its next downloads, in order.
    faults: HashMap<String, Vec<Fault>>,
}

/// The hub test double. Stops when dropped.
pub struct HubMirrorDouble {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The ETag the hub gives a file: the sha256 for LFS files (weights, tokenizer model), else a
/// git-style object id (40 hex digits, not a sha256 of the content).
fn etag(path: &str, content: &[u8]) -> String {
    let lfs = [".bin", ".pth", ".safetensors", ".model", ".pt"]
        .iter()
        .any(|ext| path.ends_with(ext));
    if lfs {
        hex(&Sha256::digest(content))
    } else {
        let mut hasher = Sha256::new();
        hasher.update(format!("blob {}\0", content.len()));
        hasher.update(content);
        hex(&hasher.finalize())[..40].to_owned()
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl HubMirrorDouble {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the hub double");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || serve(stream, &state));
                }
            })
        };
        Self {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, the value for `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `files` as repository `id` (`owner/name`) at a commit derived from the content;
    /// returns the commit.
    pub fn add_repo(&self, id: &str, files: Vec<(String, Vec<u8>)>) -> String {
        let mut hasher = Sha256::new();
        hasher.update(id);
        for (path, content) in &files {
            hasher.update(path);
            hasher.update(Sha256::digest(content));
        }
        let commit = hex(&hasher.finalize())[..40].to_owned();
        let files = files
            .into_iter()
            .map(|(path, content)| (path, Arc::new(content)))
            .collect();
        lock(&self.state).repos.insert(
            id.to_owned(),
            Repo {
                commit: commit.clone(),
                files,
                token: None,
            },
        );
        commit
    }

    /// Serves every file under `dir` (recursively) as repository `id`.
    pub fn add_dir(&self, id: &str, dir: &Path) -> String {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
            for entry in std::fs::read_dir(dir).expect("list directory").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    let relative = path.strip_prefix(root).expect("inside root");
                    out.push((
                        relative.to_string_lossy().into_owned(),
                        std::fs::read(&path).expect("read file"),
                    ));
                }
            }
        }
        let mut files = Vec::new();
        walk(dir, dir, &mut files);
        files.sort();
        self.add_repo(id, files)
    }

    /// Makes repository `id` answer 401 without a token and 403 with another one.
    pub fn require_token(&self, id: &str, token: &str) {
        lock(&self.state)
            .repos
            .get_mut(id)
            .expect("repository added")
            .token = Some(token.to_owned());
    }

    /// Serves `content` at `/files/{path}`; returns its URL.
    pub fn add_url(&self, path: &str, content: Vec<u8>) -> String {
        lock(&self.state)
            .urls
            .insert(path.to_owned(), Arc::new(content));
        format!("{}/files/{path}", self.endpoint())
    }

    /// The next download of a file named `name` stops after `bytes` bytes (the connection is
    /// closed, as when a network drops).
    pub fn cut_next_download(&self, name: &str, bytes: u64) {
        lock(&self.state)
            .faults
            .entry(name.to_owned())
            .or_default()
            .push(Fault::CutAfter(bytes));
    }

    /// The next `count` downloads of a file named `name` carry one flipped byte.
    pub fn corrupt_next_downloads(&self, name: &str, count: usize) {
        let mut state = lock(&self.state);
        let faults = state.faults.entry(name.to_owned()).or_default();
        faults.extend(std::iter::repeat_n(Fault::Corrupt, count));
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<MirrorRequest> {
        lock(&self.state).log.clone()
    }

    /// The requests for file content so far.
    pub fn downloads(&self) -> Vec<MirrorRequest> {
        self.requests()
            .into_iter()
            .filter(MirrorRequest::is_download)
            .collect()
    }

    pub fn clear_log(&self) {
        lock(&self.state).log.clear();
    }
}

impl Drop for HubMirrorDouble {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Arc<Vec<u8>>,
    /// Part of `body` to send.
    span: (usize, usize),
    fault: Option<Fault>,
}

impl Response {
    fn new(status: u16, body: Vec<u8>) -> Self {
        let len = body.len();
        Self {
            status,
            headers: Vec::new(),
            body: Arc::new(body),
            span: (0, len),
            fault: None,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        Self::new(status, format!("{{\"error\":\"{message}\"}}").into_bytes())
            .header("X-Error-Code", code)
            .header("Content-Type", "application/json")
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Error",
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) {
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(clone);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("/").to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).is_err() {
            return;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let path = target.split('?').next().unwrap_or("/").to_owned();
    let request = MirrorRequest {
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        token: headers
            .get("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned),
    };
    let response = {
        let mut state = lock(state);
        state.log.push(request.clone());
        respond(&mut state, &request)
    };
    write_response(&mut stream, &method, response);
}

fn authorize(repo: &Repo, request: &MirrorRequest) -> Option<Response> {
    match (&repo.token, &request.token) {
        (None, _) => None,
        (Some(wanted), Some(given)) if wanted == given => None,
        (Some(_), None) => Some(Response::error(
            401,
            "GatedRepo",
            "Access to this model is restricted. You must be authenticated.",
        )),
        (Some(_), Some(_)) => Some(Response::error(
            403,
            "GatedRepo",
            "Your token has no access to this model.",
        )),
    }
}

fn respond(state: &mut State, request: &MirrorRequest) -> Response {
    let segments: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    // /api/models/{owner}/{name}/revision/{revision...}
    if segments.len() >= 6
        && segments[0] == "api"
        && segments[1] == "models"
        && segments[4] == "revision"
    {
        let id = format!("{}/{}", segments[2], segments[3]);
        let revision = percent_decode(&segments[5..].join("/"));
        let Some(repo) = state.repos.get(&id) else {
            return Response::error(404, "RepoNotFound", "Repository not found");
        };
        if let Some(denied) = authorize(repo, request) {
            return denied;
        }
        if revision != "main" && revision != repo.commit {
            return Response::error(404, "RevisionNotFound", "Invalid rev id");
        }
        let siblings: Vec<String> = repo
            .files
            .keys()
            .map(|f| format!("{{\"rfilename\":\"{f}\"}}"))
            .collect();
        let body = format!(
            "{{\"id\":\"{id}\",\"modelId\":\"{id}\",\"sha\":\"{}\",\"siblings\":[{}]}}",
            repo.commit,
            siblings.join(",")
        );
        return Response::new(200, body.into_bytes()).header("Content-Type", "application/json");
    }
    let (content, etag_value, commit) = if segments.first() == Some(&"files") {
        let path = segments[1..].join("/");
        let Some(content) = state.urls.get(&path) else {
            return Response::error(404, "EntryNotFound", "No such file");
        };
        (content.clone(), None, None)
    } else if segments.len() >= 5 && segments[2] == "resolve" {
        // /{owner}/{name}/resolve/{revision}/{path...}
        let id = format!("{}/{}", segments[0], segments[1]);
        let revision = percent_decode(segments[3]);
        let file = segments[4..].join("/");
        let Some(repo) = state.repos.get(&id) else {
            return Response::error(404, "RepoNotFound", "Repository not found");
        };
        if let Some(denied) = authorize(repo, request) {
            return denied;
        }
        if revision != "main" && revision != repo.commit {
            return Response::error(404, "RevisionNotFound", "Invalid rev id");
        }
        let Some(content) = repo.files.get(&file) else {
            return Response::error(404, "EntryNotFound", "Entry not found");
        };
        (
            content.clone(),
            Some(etag(&file, content)),
            Some(repo.commit.clone()),
        )
    } else {
        return Response::error(404, "NotFound", "Not found");
    };

    let size = content.len();
    let mut response = Response::new(200, Vec::new());
    response.body = content;
    response.span = (0, size);
    if let Some(etag) = etag_value {
        response = response.header("ETag", format!("\"{etag}\""));
    }
    if let Some(commit) = commit {
        response = response.header("X-Repo-Commit", commit);
    }
    response = response.header("Accept-Ranges", "bytes");
    if let Some(range) = request
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
    {
        let (from, to) = range.split_once('-').unwrap_or((range, ""));
        let from: usize = from.trim().parse().unwrap_or(0);
        let to: usize = to
            .trim()
            .parse()
            .map(|t: usize| t + 1)
            .unwrap_or(size)
            .min(size);
        if from >= size || from >= to {
            return Response::error(416, "RangeNotSatisfiable", "Range not satisfiable")
                .header("Content-Range", format!("bytes */{size}"));
        }
        response.status = 206;
        response.span = (from, to);
        response = response.header("Content-Range", format!("bytes {from}-{}/{size}", to - 1));
    }
    if request.is_download() {
        let name = segments.last().copied().unwrap_or("");
        if let Some(faults) = state.faults.get_mut(name) {
            if !faults.is_empty() {
                response.fault = Some(faults.remove(0));
            }
        }
    }
    response
}

fn write_response(stream: &mut TcpStream, method: &str, response: Response) {
    let (from, to) = response.span;
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        to - from
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    if stream.write_all(head.as_bytes()).is_err() || method == "HEAD" {
        return;
    }
    let mut body = response.body[from..to].to_vec();
    match response.fault {
        Some(Fault::CutAfter(bytes)) => {
            let cut = (bytes as usize).min(body.len());
            let _ = stream.write_all(&body[..cut]);
            let _ = stream.flush();
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        Some(Fault::Corrupt) if !body.is_empty() => {
            let middle = body.len() / 2;
            body[middle] ^= 0x5a;
        }
        _ => {}
    }
    let _ = stream.write_all(&body);
    let _ = stream.flush();
}

/// The tiny fixture served the way a real deployment is spread over the hub: the checkpoint
/// as `test/llama-vid-tiny-video`, its Q-Former tokenizer as `google-bert/bert-base-uncased`,
/// the EVA weights both as a plain URL (like the LAVIS file) and as a hub file.
pub struct FixtureHub {
    pub mirror: HubMirrorDouble,
    /// `test/llama-vid-tiny-video`.
    pub model_id: String,
    /// Its commit: `format!("{model_id}@{commit}")` is the pinned id.
    pub commit: String,
    /// `http://127.0.0.1:PORT/files/LAVIS/eva_vit_g.pth`.
    pub eva_url: String,
    /// `test/eva-vit-g/eva_vit_g.pth`, a `vision-tower` value naming a hub file.
    pub eva_hub_file: String,
}

impl FixtureHub {
    pub fn start() -> Self {
        let fixture = crate::fixture_dir();
        let mirror = HubMirrorDouble::start();
        let model_id = "test/llama-vid-tiny-video".to_owned();
        let commit = mirror.add_dir(&model_id, &crate::model_dir());
        mirror.add_dir(
            "google-bert/bert-base-uncased",
            &fixture.join("bert-base-uncased"),
        );
        let eva =
            std::fs::read(fixture.join("model_zoo/LAVIS/eva_vit_g.pth")).expect("EVA fixture");
        mirror.add_repo(
            "test/eva-vit-g",
            vec![("eva_vit_g.pth".into(), eva.clone())],
        );
        let eva_url = mirror.add_url("LAVIS/eva_vit_g.pth", eva);
        Self {
            mirror,
            model_id,
            commit,
            eva_url,
            eva_hub_file: "test/eva-vit-g/eva_vit_g.pth".into(),
        }
    }

    /// The model id pinned to its commit.
    pub fn pinned_id(&self) -> String {
        format!("{}@{}", self.model_id, self.commit)
    }

    /// The environment a child process needs to fetch from this double into `home`.
    pub fn env(&self, home: &Path) -> Vec<(String, String)> {
        vec![
            ("HF_ENDPOINT".into(), self.mirror.endpoint()),
            ("HF_HOME".into(), home.display().to_string()),
            ("NO_PROXY".into(), "127.0.0.1".into()),
        ]
    }
}
