"use strict";
// voxflow over WebRTC: protocol v1 JSON messages on a data channel, speech on the remote audio track.
// Talk starts a conversation with the server's agent: it hears the microphone track and answers on
// the same audio track; its events arrive as `agent` messages.

const params = new URLSearchParams(location.search);
// The API may live elsewhere than the page (?server=http://host:port); by default it is this origin.
const API = (params.get("server") || location.origin).replace(/\/+$/, "");
// STUN/TURN servers; none are needed on a LAN or on loopback.
const ICE_SERVERS = [];
// Browsers on closed networks may never finish gathering; the candidates found by then suffice.
const ICE_GATHER_TIMEOUT_MS = 1000;
const CHANNEL_OPEN_TIMEOUT_MS = 10000;
const LEVEL_THRESHOLD = 0.02; // peak amplitude (full scale 1) from which audio counts as heard
// An utterance is first heard on a rise after at least this much quiet, so the tail of the
// previous one, still draining from the jitter buffer, does not count as its start.
const QUIET_BEFORE_MS = 50;
const POLL_MS = 10;
const PACKET_POLL_MS = 250;
// After Stop, sound within this window still counts as the stopped speech: a pause between
// words must not pass for the silence that follows a real stop.
const STOP_WATCH_MS = 1000;
const TOKENS_PER_SECOND = 50;
const MAX_LOG_ENTRIES = 200;

const $ = (id) => document.getElementById(id);
const stats = {
  firstAudioMs: null, packetsReceived: 0, audioLevel: 0, state: "disconnected", lastError: null, stopToSilenceMs: null,
  // The conversation (Talk): lastTurn holds the latest turn's figures, in ms (null: that step did not happen).
  listening: false, turns: 0, interruptions: 0, lastTurn: null, lastTranscript: null, lastReply: null,
};

let session = null; // {pc, dc, transceiver, id, analyser, audioCtx, samples, statsLevel}
let connecting = null; // promise of the session being set up
let current = null; // the utterance being spoken or played, see openContext
const lateCancels = new Set(); // contexts cancelled after `done`, whose audio may have ended already
let quietSince = null; // when the level last fell below the threshold; null while loud
let contextSeq = 0;
let stopWatch = null; // {at, quietAt}
let feeder = null;
let typed = 0; // characters of the text box already sent while typing
let micTrack = null;
let talk = null; // {ownsMic, listenSent, turns: Map(turn -> {you, bot} log entries)} while Talk is on

function showError(message) {
  stats.lastError = message;
  $("error").textContent = message;
  $("error").hidden = false;
}

function setState(state) {
  stats.state = state;
  $("state").textContent = state;
  $("state").dataset.state = state;
  $("connect").textContent = session || connecting ? "Disconnect" : "Connect";
}

async function api(method, path, body) {
  let res;
  try {
    res = await fetch(API + path, {
      method, headers: body ? { "content-type": "application/json" } : {}, body: body && JSON.stringify(body),
    });
  } catch (e) {
    throw new Error(`cannot reach the server at ${API} (${e.message})`);
  }
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    const err = data && data.error;
    throw new Error(err ? `${err.code}: ${err.message}` : `${method} ${path}: HTTP ${res.status}`);
  }
  return data;
}

function withTimeout(promise, ms, message) {
  return Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(message)), ms))]);
}

function iceGathered(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    const timer = setTimeout(resolve, ICE_GATHER_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

async function connect() {
  const pc = new RTCPeerConnection({ iceServers: ICE_SERVERS });
  const dc = pc.createDataChannel("voxflow", { ordered: true });
  const transceiver = pc.addTransceiver("audio", { direction: "sendrecv" });
  const s = { pc, dc, transceiver, id: null, analyser: null, audioCtx: null, samples: null, statsLevel: 0 };
  session = s;
  setState("connecting");
  pc.ontrack = (e) => attachAudio(s, e.streams[0] || new MediaStream([e.track]));
  pc.onconnectionstatechange = () => {
    if (session !== s) return;
    if (pc.connectionState === "failed") {
      showError("the WebRTC connection failed (ICE found no working path to the server)");
      setState("error");
    }
  };
  dc.onmessage = (e) => onMessage(JSON.parse(e.data));
  dc.onclose = () => {
    if (session !== s) return;
    showError("the server closed the session");
    endTalk();
    setState("disconnected");
  };
  const opened = new Promise((resolve) => { dc.onopen = resolve; });
  if (micTrack) await transceiver.sender.replaceTrack(micTrack);
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc);
  const answer = await api("POST", "/v1/webrtc/offer", { sdp: pc.localDescription.sdp, type: "offer" });
  s.id = answer.session_id;
  await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
  await withTimeout(opened, CHANNEL_OPEN_TIMEOUT_MS, "the data channel did not open (no ICE connection to the server?)");
  if (session !== s) throw new Error("disconnected while connecting");
  setState("ready");
  return s;
}

function ensureConnected() {
  if (!connecting) {
    connecting = connect().catch((e) => {
      showError(e.message);
      disconnect();
      setState("error");
      throw e;
    });
  }
  return connecting;
}

function disconnect() {
  const s = session;
  session = connecting = current = stopWatch = null;
  stopFeeder();
  endTalk();
  if (s) {
    if (s.audioCtx) s.audioCtx.close();
    // The peer connection closes once the server has ended the session: closed first, its
    // data channel's close could end the session before the DELETE arrives (then a 404).
    const closePeer = () => s.pc.close();
    if (s.id) {
      fetch(`${API}/v1/webrtc/sessions/${encodeURIComponent(s.id)}`, { method: "DELETE", keepalive: true })
        .catch(() => {})
        .finally(closePeer);
    } else {
      closePeer();
    }
  }
  setState("disconnected");
}

function attachAudio(s, stream) {
  // Chromium only decodes a remote track (and reports its level) once a media element plays it.
  const audio = $("remote");
  audio.srcObject = stream;
  audio.play().catch(() => {}); // autoplay may wait for the first click
  s.audioCtx = new AudioContext();
  s.analyser = s.audioCtx.createAnalyser();
  s.analyser.fftSize = 1024;
  s.samples = new Float32Array(s.analyser.fftSize);
  s.audioCtx.createMediaStreamSource(stream).connect(s.analyser);
}

function unlockAudio() {
  $("remote").play().catch(() => {});
  if (session && session.audioCtx) session.audioCtx.resume();
}

function level(s) {
  if (!s.audioCtx || s.audioCtx.state !== "running") return s.statsLevel; // the receiver's own, coarser level
  s.analyser.getFloatTimeDomainData(s.samples);
  let peak = 0;
  for (const v of s.samples) peak = Math.max(peak, Math.abs(v));
  return peak;
}

function send(message) {
  if (!session || session.dc.readyState !== "open") throw new Error("not connected to the server");
  session.dc.send(JSON.stringify(message));
}

function openContext() {
  if (current) silence(current); // barge-in: a new utterance cuts the previous one short
  current = {
    id: `c${++contextSeq}`,
    t0: performance.now(), // Speak, or the first fragment sent
    heardAt: null, // its audio first rose above the threshold
    stoppedAt: null,
    words: [], // {el, start, end}, seconds on its audio timeline
    audioSeconds: null, // from `metrics`
    doneAt: null,
    accepting: true, // no `end` or `cancel` sent yet
    open: true, // the server has not ended it (`done`, `cancelled`, `error`)
    silenced: false, // `cancel` sent, or ended without audio to come
  };
  stats.firstAudioMs = stats.stopToSilenceMs = null;
  stopWatch = null;
  $("transcript").textContent = "";
  send({ type: "start", context: current.id, voice: $("voice").value || undefined, style: $("style").value });
  setState("speaking");
  return current;
}

function endContext(ctx) {
  send({ type: "end", context: ctx.id });
  ctx.accepting = false;
}

// The server sends `done` once the last audio is queued, seconds before it has played, and
// still silences the rest on a `cancel` then (without answering it).
function silence(ctx) {
  if (ctx.silenced || !playing(ctx, performance.now())) return;
  send({ type: "cancel", context: ctx.id });
  if (!ctx.open) lateCancels.add(ctx.id);
  ctx.silenced = true;
  ctx.accepting = false;
}

// Word times count from the start of the audio timeline; the first word's start says how
// much leading silence came before the moment it was heard.
function origin(ctx) {
  return ctx.heardAt - (ctx.words.length ? ctx.words[0].start * 1000 : 0);
}

function playing(ctx, now) {
  if (ctx.open) return true;
  if (ctx.silenced || !ctx.audioSeconds) return false;
  return now < (ctx.heardAt !== null ? origin(ctx) : ctx.doneAt) + ctx.audioSeconds * 1000;
}

function onMessage(msg) {
  const ctx = current && msg.context === current.id ? current : null;
  if (msg.type === "word" && ctx) {
    const el = document.createElement("span");
    el.textContent = msg.word;
    $("transcript").append(el, " ");
    ctx.words.push({ el, start: msg.start, end: msg.end });
  } else if (msg.type === "metrics" && ctx) {
    ctx.audioSeconds = msg.audio_seconds;
  } else if (msg.type === "listening") {
    stats.listening = true;
    logLine("note", "Listening — say something.");
  } else if (msg.type === "agent") {
    onAgentEvent(msg.event);
  } else if (msg.type === "error") {
    // A late cancel that found the audio already over: nothing was left to silence.
    if (msg.code === "unknown_context" && lateCancels.delete(msg.context)) return;
    showError(`${msg.code}: ${msg.message}`);
    // Errors come in order: one without a context while `listen` is unanswered refuses it.
    if (msg.context == null && talk && talk.listenSent && !stats.listening) {
      talk.listenSent = false;
      endTalk();
    }
  }
  if (ctx && ["done", "cancelled", "error"].includes(msg.type)) {
    ctx.open = ctx.accepting = false;
    ctx.doneAt = performance.now();
    if (msg.type !== "done") ctx.silenced = true;
  }
}

// Pieces like a chat model's tokens: words with their leading space, long words cut into ~4 letters.
function tokens(text) {
  const out = [];
  for (const [piece] of text.matchAll(/\s*(?:[\p{L}\p{N}_]+|[^\p{L}\p{N}_\s])|\s+/gu)) {
    const word = piece.trimStart();
    if (word.length <= 6) { out.push(piece); continue; }
    const lead = piece.slice(0, piece.length - word.length);
    for (let i = 0; i < word.length; i += 4) out.push((i ? "" : lead) + word.slice(i, i + 4));
  }
  return out;
}

function feedTokens(text) {
  const ctx = openContext();
  const pieces = tokens(text);
  const start = performance.now();
  let sent = 0;
  const step = () => {
    if (current !== ctx || !ctx.accepting) return stopFeeder();
    // Due times from the start, so timer lateness does not slow the stream down.
    const due = Math.min(pieces.length, Math.floor(((performance.now() - start) / 1000) * TOKENS_PER_SECOND) + 1);
    while (sent < due) send({ type: "text", context: ctx.id, text: pieces[sent++] });
    if (sent === pieces.length) {
      endContext(ctx);
      stopFeeder();
    }
  };
  feeder = setInterval(step, 1000 / TOKENS_PER_SECOND);
  step();
}

function stopFeeder() {
  clearInterval(feeder);
  feeder = null;
}

async function speak(text) {
  unlockAudio();
  await ensureConnected();
  const ctx = openContext();
  send({ type: "text", context: ctx.id, text });
  endContext(ctx);
  return ctx.id;
}

function stop() {
  stopFeeder();
  if (current) {
    silence(current);
    current.stoppedAt = performance.now();
  }
  stopWatch = { at: performance.now(), quietAt: null };
  stats.stopToSilenceMs = null;
  typed = $("text").value.length;
}

// Type mode: each finished word goes out as soon as the space after it is typed.
function onType() {
  const value = $("text").value;
  typed = Math.min(typed, value.length);
  const lastSpace = value.search(/\s\S*$/);
  if ($("mode").value !== "type" || !session || lastSpace + 1 <= typed) return;
  const ctx = current && current.accepting ? current : openContext();
  send({ type: "text", context: ctx.id, text: value.slice(typed, lastSpace + 1) });
  typed = lastSpace + 1;
}

async function onSpeak() {
  unlockAudio();
  const box = $("text");
  if ($("mode").value === "paste") {
    await ensureConnected();
    return feedTokens(box.value);
  }
  const rest = box.value.slice(typed);
  if (current && current.accepting && typed > 0) {
    if (rest.trim()) send({ type: "text", context: current.id, text: rest });
    endContext(current);
  } else if (rest.trim()) {
    await speak(rest);
  }
  box.value = "";
  typed = 0;
}

async function micOn() {
  if (micTrack) return;
  if (!navigator.mediaDevices) throw new Error("the browser offers no microphone here (it needs https or localhost)");
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  micTrack = stream.getAudioTracks()[0];
  showMic();
  const s = await ensureConnected();
  await s.transceiver.sender.replaceTrack(micTrack);
}

function micOff() {
  if (!micTrack) return;
  micTrack.stop();
  micTrack = null;
  showMic();
  if (session) session.transceiver.sender.replaceTrack(null).catch(() => {});
}

function showMic() {
  $("mic").textContent = micTrack ? "Mic on" : "Mic off";
  $("mic").setAttribute("aria-pressed", String(Boolean(micTrack)));
}

async function toggleMic() {
  try {
    if (micTrack) micOff();
    else await micOn();
  } catch (e) {
    showError(`microphone: ${e.message}`);
  }
}

// -- Talk: a conversation with the agent ----------------------------------------------------

async function startTalking() {
  unlockAudio();
  const t = { ownsMic: !micTrack, listenSent: false, turns: new Map() };
  talk = t;
  showTalk();
  $("conversation").hidden = false;
  await micOn(); // connects too
  if (talk !== t) { // stopped while the microphone was opening
    if (t.ownsMic) micOff();
    return;
  }
  // A WebRTC session hears its microphone track and answers on its audio track, whatever the
  // rates asked here; `listening` says what it uses.
  send({ type: "listen" });
  talk.listenSent = true;
}

function stopTalking() {
  if (talk && talk.listenSent && session && session.dc.readyState === "open") send({ type: "stop_listening" });
  if (stats.listening) logLine("note", "Stopped listening.");
  endTalk();
}

// Talk is off, whatever ended it (the button, a refusal, a lost session); the server is told elsewhere.
function endTalk() {
  const t = talk;
  talk = null;
  stats.listening = false;
  if (t && t.ownsMic) micOff();
  showTalk();
}

function showTalk() {
  $("talk").textContent = talk ? "Talking…" : "Talk";
  $("talk").setAttribute("aria-pressed", String(Boolean(talk)));
}

async function toggleTalk() {
  try {
    if (talk) stopTalking();
    else await startTalking();
  } catch (e) {
    showError(`talk: ${e.message}`);
    endTalk();
  }
}

function logLine(kind, text) {
  const log = $("log");
  const entry = document.createElement("li");
  entry.className = kind;
  entry.textContent = text;
  log.append(entry);
  while (log.children.length > MAX_LOG_ENTRIES) log.firstElementChild.remove();
  log.scrollTop = log.scrollHeight;
  return entry;
}

const ms = (value) => (value === null || value === undefined ? "–" : `${Math.round(value)} ms`);

function showTurn(m) {
  stats.lastTurn = {
    turn: m.turn, voiceToVoiceMs: m.voice_to_voice_ms, endOfTurnMs: m.end_of_turn_ms, asrMs: m.asr_ms,
    llmFirstTokenMs: m.llm_first_token_ms, ttsFirstAudioMs: m.tts_first_audio_ms,
  };
  $("v2v").textContent = ms(m.voice_to_voice_ms);
  $("end-of-turn").textContent = ms(m.end_of_turn_ms);
  $("asr").textContent = ms(m.asr_ms);
  $("llm").textContent = ms(m.llm_first_token_ms);
  $("tts").textContent = ms(m.tts_first_audio_ms);
}

// One agent event (voxflow/agent/events.py): the log keeps one "you" and one "bot" entry per turn.
function onAgentEvent(e) {
  if (!talk) return;
  const turns = talk.turns;
  const turn = (n) => turns.get(n) || turns.set(n, {}).get(n);
  if (e.type === "speech_started") {
    turn(e.turn).you = logLine("you pending", "…");
  } else if (e.type === "transcript") {
    const entry = turn(e.turn);
    entry.you = entry.you || logLine("you", "");
    entry.you.className = e.text ? "you" : "you pending";
    entry.you.textContent = e.text || "(nothing recognised)";
    stats.lastTranscript = e.text;
  } else if (e.type === "reply") {
    turn(e.turn).bot = logLine("bot", e.text || "…");
    if (e.error) turn(e.turn).bot.append(` (${e.error})`);
    stats.lastReply = e.text;
  } else if (e.type === "interrupted") {
    stats.interruptions += 1;
    const note = document.createElement("span");
    note.className = "cut";
    note.textContent = e.spoken ? `interrupted after “${e.spoken}”` : "interrupted before a word was heard";
    (turn(e.turn).bot || logLine("note", "")).append(note);
  } else if (e.type === "turn_metrics") {
    stats.turns += 1;
    showTurn(e);
  } else if (e.type === "error") {
    logLine("error", `${e.code}: ${e.message}`);
  }
  $("turns").textContent = `${stats.turns} · ${stats.interruptions}`;
  for (const n of [...turns.keys()].slice(0, -8)) turns.delete(n); // only recent turns get late events
}

async function loadVoices() {
  const { default: preferred, voices } = await api("GET", "/v1/voices");
  for (const v of voices) $("voice").add(new Option(v.name, v.name, false, v.name === preferred));
}

function poll() {
  const now = performance.now();
  stats.audioLevel = session ? level(session) : 0;
  const loud = stats.audioLevel >= LEVEL_THRESHOLD;
  if (current && current.heardAt === null && !current.silenced && loud && quietSince !== null && now - quietSince >= QUIET_BEFORE_MS) {
    current.heardAt = now;
    stats.firstAudioMs = Math.round(now - current.t0);
  }
  quietSince = loud ? null : quietSince ?? now;
  if (session && ["ready", "speaking"].includes(stats.state)) {
    const speaking = Boolean(current && playing(current, now));
    if (speaking !== (stats.state === "speaking")) setState(speaking ? "speaking" : "ready");
  }
  if (stopWatch) {
    if (loud) stopWatch.quietAt = null;
    else if (stopWatch.quietAt === null) stopWatch.quietAt = now;
    if (now - stopWatch.at >= STOP_WATCH_MS) {
      // Still loud at the end of the window: report the whole window, the sound did not stop.
      stats.stopToSilenceMs = Math.round((stopWatch.quietAt ?? now) - stopWatch.at);
      stopWatch = null;
    }
  }
}

async function pollPackets() {
  const s = session;
  if (!s || !s.transceiver.receiver.track) return;
  const report = await s.transceiver.receiver.getStats();
  report.forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "audio") {
      stats.packetsReceived = r.packetsReceived;
      s.statsLevel = r.audioLevel || 0;
    }
  });
}

function render() {
  const now = performance.now();
  $("first-audio").textContent = stats.firstAudioMs !== null ? `${stats.firstAudioMs} ms` : current && playing(current, now) ? "…" : "–";
  $("stop-silence").textContent = stats.stopToSilenceMs !== null ? `${stats.stopToSilenceMs} ms` : stopWatch ? "…" : "–";
  $("packets").textContent = stats.packetsReceived;
  $("level").value = stats.audioLevel;
  if (current && current.heardAt !== null) {
    const t = (Math.min(now, current.stoppedAt ?? now) - origin(current)) / 1000;
    for (const w of current.words) {
      w.el.classList.toggle("now", w.start <= t && t < w.end);
      w.el.classList.toggle("said", t >= w.end);
    }
  }
  requestAnimationFrame(render);
}

const reportError = (e) => showError(e.message);
$("speak").onclick = () => onSpeak().catch(reportError);
$("stop").onclick = () => { try { stop(); } catch (e) { reportError(e); } };
$("mic").onclick = toggleMic;
$("talk").onclick = toggleTalk;
$("connect").onclick = () => (session || connecting ? disconnect() : ensureConnected().catch(() => {}));
$("text").addEventListener("input", () => { try { onType(); } catch (e) { reportError(e); } });
window.addEventListener("pagehide", disconnect);
setInterval(poll, POLL_MS);
setInterval(() => pollPackets().catch(() => {}), PACKET_POLL_MS);
requestAnimationFrame(render);

window.voxflow = { stats, speak, stop, connect: ensureConnected, disconnect, talk: toggleTalk };
loadVoices().catch(reportError);
ensureConnected().catch(() => {});
