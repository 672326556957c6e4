// Types of pmq-client (index.js): PMQ's JavaScript client for browsers and Node.

/** A message as PMQ delivers it (a push's `msg`). `id` is a decimal string of a time-ordered
 * 64-bit integer; a broadcast has `to: null` and names its `group`. */
export interface Message {
  id: string;
  kind: string;
  from: string | null;
  to: string | null;
  group?: string;
  body: any;
  ts: number;
}

/** The badge counters, one per kind, and their total. */
export interface Unread {
  comment: number;
  notice: number;
  letter: number;
  system: number;
  cs: number;
  total: number;
  [kind: string]: number;
}

export interface Hello {
  type: "hello";
  conn_id: string;
  uid: string;
  heartbeat: number;
}

export interface Disconnected {
  code: number;
  reason: string;
  /** When the next try starts; null when the client stopped. */
  retryInMs: number | null;
}

export interface Stopped {
  /** "closed" (client.close()), "kicked" (close 4001), "too many connections" (close 4008),
   * "unauthorized" / "forbidden" (a 401 / 403 the WebSocket implementation reported),
   * "token" (the token callback threw or gave no token), "no WebSocket". */
  reason: string;
  /** The close code, or the handshake's status. */
  code?: number;
  /** The close frame's reason (a kick's "reason"). */
  detail?: string;
  /** What the token callback threw. */
  error?: unknown;
}

export interface CsAssigned {
  type: "cs.assigned";
  session_id: string;
  user?: string;
  agent?: string;
}

export interface CsClosed {
  type: "cs.closed";
  session_id: string;
  by: string | null;
  reason?: string;
}

export interface Events {
  connected: Hello;
  disconnected: Disconnected;
  message: Message;
  unread: Unread;
  revoke: { id: string };
  update: { msg: Message };
  stopped: Stopped;
  "cs.assigned": CsAssigned;
  "cs.closed": CsClosed;
}

export type Token = string | (() => string | Promise<string>);

export interface Options {
  /** ws:// or wss:// URL of the node's /ws; in a page, relative to it (default "/ws"). */
  url?: string;
  /** A string, or a function called before each connect (for a fresh token); a function
   * that throws stops the client. */
  token: Token;
  /** WebSocket constructor; default globalThis.WebSocket (Node 18-21: the ws package's). */
  WebSocket?: new (url: string) => any;
  /** Reconnect back-off: a random delay in [0, min(capMs, baseMs * 2^attempt)], attempt
   * counting the failed tries since the last hello (default 500 and 10000). */
  backoff?: { baseMs?: number; capMs?: number };
  /** Time for one connect: TCP, upgrade and hello (default 30000). */
  connectTimeoutMs?: number;
  requestTimeoutMs?: number;
  ackDelayMs?: number;
  ackBatch?: number;
  dedupeSize?: number;
  autoAck?: boolean;
}

export type State = "idle" | "connecting" | "open" | "waiting" | "stopped";

export type Content = { text: string } | { image: { url: string; width?: number; height?: number } };

/** Order of two message ids, for sort(). */
export function compareIds(a: string, b: string): number;

export class PmqError extends Error {
  /** The reply's code, or "timeout", "disconnected", "closed" for a request without one. */
  code: number | "timeout" | "disconnected" | "closed";
  msg: string;
}

export class PmqClient {
  constructor(options: Options);
  state: State;
  uid: string | null;
  connId: string | null;
  unread: Unread | null;

  on<K extends keyof Events>(name: K, fn: (value: Events[K]) => unknown): this;
  on(name: string, fn: (frame: any) => unknown): this;
  off<K extends keyof Events>(name: K, fn: (value: Events[K]) => unknown): this;
  off(name: string, fn: (frame: any) => unknown): this;

  connect(): Promise<Hello>;
  close(): void;

  request<T = any>(action: string, data?: object): Promise<T>;
  ping(): Promise<{ ts: number }>;
  ack(ids: string[]): Promise<void>;
  pull(options?: { after?: string; limit?: number }): Promise<{ messages: Message[] }>;
  unreadGet(): Promise<Unread>;
  unreadClear(kinds?: string[]): Promise<{ cleared: string[] }>;
  list(options?: {
    kind?: string;
    before?: string;
    limit?: number;
    unreadOnly?: boolean;
  }): Promise<{ messages: (Message & { read: boolean })[]; next: string | null }>;
  read(what?: { ids?: string[]; kinds?: string[] }): Promise<{ read: number }>;
  csOpen(): Promise<{ session_id: string; agent: string | null; queued: boolean; position?: number }>;
  csSend(sessionId: string, content: Content): Promise<{ id: string }>;
  csClose(sessionId: string): Promise<{ session_id: string }>;
  csHistory(options: {
    sessionId?: string;
    peer?: string;
    before?: string;
    limit?: number;
  }): Promise<{ messages: Message[]; session?: { session_id: string; user: string; agent: string | null; status: string } }>;
  csSessions(): Promise<{
    sessions: { session_id: string; user: string; opened: number; active: number; last: Message | null }[];
    queued: number;
  }>;
}
