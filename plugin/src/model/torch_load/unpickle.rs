//! The pickle machine of `torch_load`: data opcodes only, globals from a fixed list, values
//! in an arena (indices, no recursion), every length checked against the bytes present.

use std::collections::HashMap;

use candle_core::DType;

/// Most dimensions a tensor may have (torch's own limit is 64; checkpoints use at most 5).
const MAX_RANK: usize = 16;
/// Most values a pickle may create (~15 per tensor of a state dict): bounds the arena at
/// 64 MiB whatever the pickle holds.
const MAX_VALUES: usize = 1 << 21;

/// A tensor as the pickle describes it, before its storage is checked.
#[derive(Debug, Clone)]
pub(super) struct RawTensor {
    pub(super) dtype: DType,
    pub(super) shape: Vec<usize>,
    pub(super) stride: Vec<usize>,
    pub(super) offset: usize,
    pub(super) storage: String,
    pub(super) storage_numel: usize,
}

/// Why the pickle was refused, with the byte offset of the opcode at fault.
#[derive(Debug)]
pub(super) struct PickleError {
    at: usize,
    msg: String,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "data.pkl, byte {}: {}", self.at, self.msg)
    }
}

/// The globals a `torch.save` state dict refers to; nothing else may be named.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.<Kind>Storage` (None: a storage type candle has no dtype for).
    Storage(Option<DType>, &'static str),
    /// `torch.Tensor` or `torch.nn.Parameter`, as the type argument of `_rebuild_from_type_v2`.
    TensorType,
}

fn allowed_global(module: &str, name: &str) -> Option<Global> {
    let global = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch._tensor", "Tensor") | ("torch", "Tensor") => Global::TensorType,
        ("torch.nn.parameter", "Parameter") => Global::TensorType,
        ("torch", storage) => {
            const STORAGES: &[(&str, Option<DType>)] = &[
                ("FloatStorage", Some(DType::F32)),
                ("DoubleStorage", Some(DType::F64)),
                ("HalfStorage", Some(DType::F16)),
                ("BFloat16Storage", Some(DType::BF16)),
                ("ByteStorage", Some(DType::U8)),
                ("ShortStorage", Some(DType::I16)),
                ("IntStorage", Some(DType::I32)),
                ("LongStorage", Some(DType::I64)),
                ("CharStorage", None),
                ("BoolStorage", None),
                ("ComplexFloatStorage", None),
                ("ComplexDoubleStorage", None),
            ];
            let &(name, dtype) = STORAGES.iter().find(|(n, _)| *n == storage)?;
            Global::Storage(dtype, name)
        }
        _ => return None,
    };
    Some(global)
}

type Id = u32;

/// A value of the pickle; containers refer to other values by their index in the arena.
#[derive(Debug)]
enum Node {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Box<str>),
    Tuple(Box<[Id]>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(Global),
    Storage {
        dtype: DType,
        key: Box<str>,
        numel: usize,
    },
    Tensor(Box<RawTensor>),
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::None => "None",
            Node::Bool => "a bool",
            Node::Int(_) => "an int",
            Node::Float => "a float",
            Node::Str(_) => "a string",
            Node::Tuple(_) => "a tuple",
            Node::List(_) => "a list",
            Node::Dict(_) => "a dict",
            Node::Global(_) => "a global",
            Node::Storage { .. } => "a storage",
            Node::Tensor(_) => "a tensor",
        }
    }
}

/// The pickle machine: data opcodes only, globals from [`allowed_global`], no recursion.
pub(super) struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run, for errors.
    op_at: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

type PResult<T> = std::result::Result<T, PickleError>;

/// Opcodes that construct objects or call code: never accepted.
fn code_opcode(op: u8) -> Option<&'static str> {
    Some(match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        _ => return None,
    })
}

impl<'a> Unpickler<'a> {
    /// Runs `data` and returns the state dict's tensors by name.
    pub(super) fn run(data: &'a [u8]) -> PResult<Vec<(String, RawTensor)>> {
        let mut machine = Unpickler {
            data,
            pos: 0,
            op_at: 0,
            nodes: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        };
        let top = machine.execute()?;
        machine.state_dict(top)
    }

    fn fail<T>(&self, msg: impl Into<String>) -> PResult<T> {
        Err(PickleError {
            at: self.op_at,
            msg: msg.into(),
        })
    }

    fn bytes(&mut self, n: u64) -> PResult<&'a [u8]> {
        let remaining = (self.data.len() - self.pos) as u64;
        if n > remaining {
            return self.fail(format!(
                "needs {n} more bytes, the pickle has {remaining} (truncated?)"
            ));
        }
        let slice = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> PResult<[u8; N]> {
        Ok(self.bytes(N as u64)?.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().take(256).position(|&b| b == b'\n') else {
            return self.fail("a GLOBAL name without its newline (or longer than 256 bytes)");
        };
        self.pos += end + 1;
        match std::str::from_utf8(&rest[..end]) {
            Ok(line) => Ok(line),
            Err(_) => self.fail("a GLOBAL name that is not UTF-8"),
        }
    }

    fn text(&mut self, len: u64) -> PResult<String> {
        let bytes = self.bytes(len)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => self.fail("a string that is not UTF-8"),
        }
    }

    fn push(&mut self, node: Node) -> PResult<()> {
        if self.nodes.len() >= MAX_VALUES {
            return self.fail(format!(
                "creates more than {MAX_VALUES} values: far more than a state dict needs"
            ));
        }
        self.nodes.push(node);
        self.stack.push((self.nodes.len() - 1) as Id);
        Ok(())
    }

    fn pop(&mut self) -> PResult<Id> {
        match self.stack.pop() {
            Some(id) => Ok(id),
            None => self.fail("pops an empty stack"),
        }
    }

    fn top(&self) -> PResult<Id> {
        match self.stack.last() {
            Some(&id) => Ok(id),
            None => self.fail("needs a value on an empty stack"),
        }
    }

    /// The values pushed since the last MARK (which is removed).
    fn pop_mark(&mut self) -> PResult<Vec<Id>> {
        match self.marks.pop() {
            Some(height) if height <= self.stack.len() => Ok(self.stack.split_off(height)),
            Some(_) => self.fail("the stack was popped below its MARK"),
            None => self.fail("no MARK to pop to"),
        }
    }

    fn node(&self, id: Id) -> &Node {
        &self.nodes[id as usize]
    }

    fn memo_put(&mut self, key: u32) -> PResult<()> {
        let top = self.top()?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> PResult<()> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => self.fail(format!(
                "refers to memo entry {key}, which was never stored"
            )),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> PResult<()> {
        match allowed_global(module, name) {
            Some(global) => {
                self.push(Node::Global(global))?;
                Ok(())
            }
            None => self.fail(format!(
                "refers to `{module}.{name}`: only the tensor rebuild functions and storage types \
                 of torch.save may appear (a pickle naming anything else would run code if \
                 torch.load unpickled it; refused, nothing was executed)"
            )),
        }
    }

    fn execute(&mut self) -> PResult<Id> {
        loop {
            self.op_at = self.pos;
            let op = self.u8()?;
            if let Some(name) = code_opcode(op) {
                return self.fail(format!(
                    "opcode {name} constructs an object by calling code; refused, nothing was \
                     executed"
                ));
            }
            match op {
                0x80 => {
                    let version = self.u8()?;
                    if version > 5 {
                        return self.fail(format!("pickle protocol {version} is unknown"));
                    }
                }
                0x95 => {
                    self.bytes(8)?; // FRAME: the whole pickle is in memory already.
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                b'N' => self.push(Node::None)?,
                0x88 | 0x89 => self.push(Node::Bool)?,
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(v.into()))?
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Node::Int(v.into()))?
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Node::Int(v.into()))?
                }
                0x8a => {
                    let n = self.u8()?;
                    if n > 8 {
                        return self.fail(format!("an integer of {n} bytes"));
                    }
                    let bytes = self.bytes(n.into())?;
                    let mut v: i64 = 0;
                    for (i, &b) in bytes.iter().enumerate() {
                        v |= i64::from(b) << (8 * i);
                    }
                    // Two's complement of n bytes: sign-extend.
                    if (1..8).contains(&n) && bytes[n as usize - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Node::Int(v))?
                }
                b'G' => {
                    self.bytes(8)?;
                    self.push(Node::Float)?
                }
                b'X' => {
                    let len = self.u32()?;
                    let s = self.text(len.into())?;
                    self.push(Node::Str(s.into()))?
                }
                0x8c => {
                    let len = self.u8()?;
                    let s = self.text(len.into())?;
                    self.push(Node::Str(s.into()))?
                }
                0x8d => {
                    let len = u64::from_le_bytes(self.array()?);
                    let s = self.text(len)?;
                    self.push(Node::Str(s.into()))?
                }
                b')' => self.push(Node::Tuple(Box::default()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items.into()))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return self.fail("a TUPLE of more values than the stack holds");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Node::Tuple(items.into()))?
                }
                b']' => self.push(Node::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))?
                }
                b'a' => {
                    let value = self.pop()?;
                    self.extend_list(vec![value])?;
                }
                b'e' => {
                    let values = self.pop_mark()?;
                    self.extend_list(values)?;
                }
                b'}' => self.push(Node::Dict(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push(Node::Dict(pairs))?
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.extend_dict(vec![(key, value)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.extend_dict(pairs)?;
                }
                b'q' => {
                    let key = self.u8()?;
                    self.memo_put(key.into())?
                }
                b'r' => {
                    let key = self.u32()?;
                    self.memo_put(key)?
                }
                0x94 => {
                    let key = self.memo.len() as u32;
                    self.memo_put(key)?
                }
                b'h' => {
                    let key = self.u8()?;
                    self.memo_get(key.into())?
                }
                b'j' => {
                    let key = self.u32()?;
                    self.memo_get(key)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (self.node(module), self.node(name)) {
                        (Node::Str(m), Node::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n)?
                        }
                        _ => return self.fail("STACK_GLOBAL of values that are not strings"),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.storage(pid)?;
                    self.push(storage)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let value = self.reduce(callable, args)?;
                    self.push(value)?
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    // A dict's attributes (a state_dict's `_metadata`): dropped. Nothing else
                    // may be built: BUILD would call the object's __setstate__.
                    let ok = matches!(self.node(target), Node::Dict(_))
                        && matches!(
                            self.node(state),
                            Node::Dict(_) | Node::None | Node::Tuple(_)
                        );
                    if !ok {
                        return self.fail(format!(
                            "BUILD of {} with {} would call code (__setstate__); refused",
                            self.node(target).kind(),
                            self.node(state).kind()
                        ));
                    }
                }
                other => {
                    return self.fail(format!(
                        "opcode {other:#04x} ({:?}) is not one torch.save writes",
                        other as char
                    ))
                }
            }
        }
    }

    fn pairs(&self, items: Vec<Id>) -> PResult<Vec<(Id, Id)>> {
        if !items.len().is_multiple_of(2) {
            return self.fail("dict items of an odd count");
        }
        Ok(items.chunks(2).map(|kv| (kv[0], kv[1])).collect())
    }

    fn extend_list(&mut self, values: Vec<Id>) -> PResult<()> {
        let target = self.top()?;
        match &mut self.nodes[target as usize] {
            Node::List(items) => {
                items.extend(values);
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.fail(format!("APPEND to {kind} (would call its append method)"))
            }
        }
    }

    fn extend_dict(&mut self, pairs: Vec<(Id, Id)>) -> PResult<()> {
        let target = self.top()?;
        match &mut self.nodes[target as usize] {
            Node::Dict(items) => {
                items.extend(pairs);
                Ok(())
            }
            other => {
                let kind = other.kind();
                self.fail(format!("SETITEM on {kind} (would call its __setitem__)"))
            }
        }
    }

    fn int(&self, id: Id, what: &str) -> PResult<usize> {
        match self.node(id) {
            Node::Int(v) if *v >= 0 => Ok(*v as usize),
            Node::Int(v) => self.fail(format!("{what} is negative ({v})")),
            other => self.fail(format!("{what} is {}, not an int", other.kind())),
        }
    }

    fn ints(&self, id: Id, what: &str) -> PResult<Vec<usize>> {
        match self.node(id) {
            Node::Tuple(items) if items.len() <= MAX_RANK => {
                items.iter().map(|&i| self.int(i, what)).collect()
            }
            Node::Tuple(items) => self.fail(format!("{what} has {} dimensions", items.len())),
            other => self.fail(format!("{what} is {}, not a tuple", other.kind())),
        }
    }

    fn tuple(&self, id: Id, what: &str, lens: &[usize]) -> PResult<Vec<Id>> {
        match self.node(id) {
            Node::Tuple(items) if lens.contains(&items.len()) => Ok(items.to_vec()),
            Node::Tuple(items) => self.fail(format!(
                "{what} takes {lens:?} arguments, the pickle gives {}",
                items.len()
            )),
            other => self.fail(format!(
                "{what}: arguments are {}, not a tuple",
                other.kind()
            )),
        }
    }

    /// `persistent_load(('storage', torch.<Kind>Storage, key, location, numel))`.
    fn storage(&self, pid: Id) -> PResult<Node> {
        let fields = self.tuple(pid, "a persistent id", &[5])?;
        let (tag, class, key, numel) = (fields[0], fields[1], fields[2], fields[4]);
        if !matches!(self.node(tag), Node::Str(t) if &**t == "storage") {
            return self.fail("a persistent id that is not a storage");
        }
        let dtype = match self.node(class) {
            Node::Global(Global::Storage(Some(dtype), _)) => *dtype,
            Node::Global(Global::Storage(None, name)) => {
                return self.fail(format!("storage type torch.{name} is not supported"))
            }
            other => return self.fail(format!("a storage whose type is {}", other.kind())),
        };
        let key = match self.node(key) {
            Node::Str(k)
                if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                k.clone()
            }
            _ => return self.fail("a storage key that is not a plain name"),
        };
        let numel = self.int(numel, "a storage's element count")?;
        Ok(Node::Storage { dtype, key, numel })
    }

    fn reduce(&self, callable: Id, args: Id) -> PResult<Node> {
        let global = match self.node(callable) {
            Node::Global(g) => *g,
            other => {
                return self.fail(format!(
                    "REDUCE calls {}, not one of torch's rebuild functions",
                    other.kind()
                ))
            }
        };
        match global {
            Global::OrderedDict => {
                self.tuple(args, "OrderedDict", &[0])?;
                Ok(Node::Dict(Vec::new()))
            }
            Global::RebuildTensorV2 | Global::RebuildTensor => self.rebuild_tensor(global, args),
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let lens: &[usize] = if global == Global::RebuildParameter {
                    &[3]
                } else {
                    &[4]
                };
                let a = self.tuple(args, "_rebuild_parameter", lens)?;
                match self.node(a[0]) {
                    Node::Tensor(t) => Ok(Node::Tensor(t.clone())),
                    other => self.fail(format!("a Parameter of {}", other.kind())),
                }
            }
            Global::RebuildFromTypeV2 => {
                let a = self.tuple(args, "_rebuild_from_type_v2", &[4])?;
                if !matches!(self.node(a[1]), Node::Global(Global::TensorType)) {
                    return self
                        .fail("_rebuild_from_type_v2 of a type other than Tensor or Parameter");
                }
                match self.node(a[0]) {
                    Node::Global(g @ (Global::RebuildTensorV2 | Global::RebuildTensor)) => {
                        self.rebuild_tensor(*g, a[2])
                    }
                    _ => self
                        .fail("_rebuild_from_type_v2 of a function other than _rebuild_tensor_v2"),
                }
            }
            Global::Storage(_, name) => self.fail(format!(
                "REDUCE calls torch.{name} (a storage is only ever a persistent id)"
            )),
            Global::TensorType => self.fail("REDUCE calls a tensor type's constructor"),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    fn rebuild_tensor(&self, global: Global, args: Id) -> PResult<Node> {
        let lens: &[usize] = if global == Global::RebuildTensor {
            &[4]
        } else {
            &[6, 7]
        };
        let a = self.tuple(args, "_rebuild_tensor_v2", lens)?;
        let (dtype, key, numel) = match self.node(a[0]) {
            Node::Storage { dtype, key, numel } => (*dtype, key.clone(), *numel),
            other => return self.fail(format!("a tensor whose storage is {}", other.kind())),
        };
        Ok(Node::Tensor(Box::new(RawTensor {
            dtype,
            offset: self.int(a[1], "a tensor's storage offset")?,
            shape: self.ints(a[2], "a tensor's size")?,
            stride: self.ints(a[3], "a tensor's stride")?,
            storage: key.into(),
            storage_numel: numel,
        })))
    }

    /// The tensors of the top-level dict (other values, such as ints, are ignored).
    fn state_dict(&self, top: Id) -> PResult<Vec<(String, RawTensor)>> {
        let items = match self.node(top) {
            Node::Dict(items) => items,
            other => {
                return self.fail(format!(
                    "the pickle holds {}, not a state dict (a dict of tensors)",
                    other.kind()
                ))
            }
        };
        let mut tensors = Vec::new();
        for &(key, value) in items {
            if let (Node::Str(name), Node::Tensor(t)) = (self.node(key), self.node(value)) {
                tensors.push((name.to_string(), (**t).clone()));
            }
        }
        Ok(tensors)
    }
}
